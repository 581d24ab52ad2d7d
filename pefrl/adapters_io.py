"""Saving and loading the bundle's adapters and value head (the layout of RUN_DIR/final and of checkpoints).

    out_dir/<adapter>/adapter_model.safetensors + adapter_config.json     every adapter, peft format
    out_dir/value_head.safetensors                                         the value head, if any
    out_dir/pefrl_heads.json                                               how they fit together
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pefrl.models import Models

HEADS_FILE, VALUE_HEAD_FILE = "pefrl_heads.json", "value_head.safetensors"


def save_adapters(models: Models, out_dir: str | Path) -> None:
    """Every adapter in peft format (out_dir/<name>/adapter_model.safetensors + adapter_config.json), the value
    head as value_head.safetensors, and pefrl_heads.json saying how they fit together."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(models.model.peft_config)
    models.model.save_pretrained(str(out), selected_adapters=names, safe_serialization=True)
    if models.value_head is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in models.value_head.state_dict().items()}
        save_file(state, str(out / VALUE_HEAD_FILE))
    meta = {"adapters": names, "critic": models.critic, "reference": models.reference,
            "value_head": models.value_head is not None}
    (out / HEADS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_adapters(models: Models, in_dir: str | Path) -> None:
    """Load weights written by save_adapters into `models` (same adapters and critic mode), for resume or eval.

    Adapters the checkpoint has but `models` lacks (e.g. 'critic' when evaluating without a critic) are skipped;
    an adapter or head `models` has but the checkpoint lacks raises, since resuming would silently restart it.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    src = Path(in_dir)
    meta_path = src / HEADS_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} missing: {src} is not a pefrl adapter directory")
    meta = json.loads(meta_path.read_text())
    for name in models.model.peft_config:
        if name not in meta["adapters"]:
            raise ValueError(f"checkpoint {src} has no adapter {name!r} (it has {meta['adapters']})")
        weights = load_peft_weights(str(src / name), device=str(next(models.model.parameters()).device))
        result = set_peft_model_state_dict(models.model, weights, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter {name!r} in {src} does not fit: unexpected {result.unexpected_keys[:5]}")
    if models.value_head is not None:
        if not meta["value_head"] or meta["critic"] != models.critic:
            raise ValueError(f"checkpoint {src} critic is {meta['critic']!r}, models use {models.critic!r}")
        head = load_file(str(src / VALUE_HEAD_FILE), device=str(next(models.value_head.parameters()).device))
        models.value_head.load_state_dict(head)
