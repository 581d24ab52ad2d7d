"""The one line a run prints at setup: who runs what, on what, training how much.

    pefrl ppo: 1 process, cpu, float32, model /path/tiny-arith (llama, 0.59M params), trainable 0.12M
    (lora r=16 on 14 modules = 2 layers x (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj) + critic adapter + value head)

It answers what a log reader asks first: how many processes ran (a multi-process run otherwise never says), on
which device and dtype, which base, how much of it the optimizer touches, and which layers LoRA adapts (a
family whose projections went unadapted shows here).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from pefrl.config import Config
from pefrl.models import POLICY, Models, resolve_model_path


def count(n: int) -> str:
    """1234567 -> '1.23M', 59000 -> '0.06M', 1.5e9 -> '1.50B'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def start_line(cfg: Config, models: Models, world_size: int, device: Any) -> str:
    """`pefrl <algo>: <N> process(es), <device>, <dtype>, model <path> (<type>, <params>), trainable <params>
    (lora r=<r> on <modules> [+ critic adapter] [+ value head])`."""
    model = models.model
    base = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    trainable = sum(p.numel() for p in models.trainable_parameters())
    r = model.peft_config[POLICY].r
    extras = (" + critic adapter" if models.critic == "adapter" else "") + (
        " + value head" if models.value_head is not None else "")
    dtype = cfg.model.dtype + (f" {cfg.model.quantization} base" if cfg.model.quantization else "")
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    kind = getattr(model.config, "model_type", "?")
    return (f"pefrl {cfg.algo}: {processes}, {getattr(device, 'type', device)}, {dtype}, model "
            f"{resolve_model_path(cfg.model)} ({kind}, {count(base)} params), trainable {count(trainable)} "
            f"(lora r={r} on {adapted_modules(model)}{extras})")


def adapted_modules(model) -> str:
    """The policy adapter's modules: '14 modules = 2 layers x (q_proj, k_proj, ...)' when every layer (a module
    path up to its first index, e.g. model.layers.0) holds the same ones, else '15 modules (<leaf names>)'."""
    paths = [name for name, m in model.named_modules() if POLICY in getattr(m, "lora_A", {})]
    names = ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    per_layer = Counter(re.sub(r"(\.\d+)\..*", r"\1", p) for p in paths if re.search(r"\.\d+\.", p))
    if sum(per_layer.values()) == len(paths) and len(set(per_layer.values())) == 1:
        return f"{len(paths)} modules = {len(per_layer)} layers x ({names})"
    return f"{len(paths)} modules ({names})"
