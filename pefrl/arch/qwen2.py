"""Qwen2: the Llama layer with biases on q/k/v (pefrl/arch/llama.py's lean layer adds any bias it finds)."""

from dataclasses import replace

from pefrl.arch.llama import FAMILY as LLAMA

FAMILY = replace(LLAMA, name="qwen2")
