"""GPT-2: projections are transformers' Conv1D (weights stored transposed) under other names; no lean decoder."""

from pefrl.arch.base import Family

FAMILY = Family("gpt2", lora_targets=("c_attn", "c_proj", "c_fc"))
