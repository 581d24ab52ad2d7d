"""Builtin tasks: prompt sets, rule rewards and evaluation for the embedded default model."""
