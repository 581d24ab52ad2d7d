"""Mistral: the Llama layer (sliding-window configs are refused by decode.unsupported_reason)."""

from dataclasses import replace

from pefrl.arch.llama import FAMILY as LLAMA

FAMILY = replace(LLAMA, name="mistral")
