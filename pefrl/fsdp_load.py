"""Sharded loading under FSDP: each rank reads only its own rows of each sharded base weight from the checkpoint.

accelerate's `fsdp_cpu_ram_efficient_loading: true` (its launcher's default), implemented for pefrl's own sharding
(pefrl/fsdp.py `shard_models`). Without it every rank loads the whole base through transformers and `fully_shard`
then keeps 1/N of each decoder layer: the load peak of a rank is the whole base. With it:

    every rank   base_without_weights (pefrl/models/load.py): modules and buffers, parameters stand-ins (no bytes)
                 + the adapters, added by peft as over a loaded base (same seed, same adapters as without FSDP)
    per layer    stand-ins to meta, fully_shard, to_empty: each rank allocates only its shard of the layer's
                 weights (dim 0, torch.chunk's split; pefrl/fsdp.py), never a whole weight
    fill         this rank's rows of every sharded weight, the whole of every replicated one (embeddings, final
                 norm, lm_head), read from the safetensors file(s) with safe_open(...).get_slice(name)[start:end]

so a rank's load peak is its share of the base (memory_model.fsdp_rank_base_bytes) plus one tensor in flight.
Accelerate's own version (rank 0 loads the whole base, the others start on meta, then a broadcast) would keep
rank 0's peak at the whole base; reading from the file lets every rank stop at its share.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pefrl.models.load import is_stand_in
from pefrl.models.prequantized import INDEX, SINGLE, checkpoint_files, read_header

VARIABLE = "FSDP_CPU_RAM_EFFICIENT_LOADING"
CLAIMED = "PEFRL_" + VARIABLE  # the launcher's value, kept once pefrl has claimed the setting


def claim_sharded_loading() -> bool:
    """fsdp_config.fsdp_cpu_ram_efficient_loading, as `accelerate launch` exports it, taken for pefrl alone.

    Unset counts as true, accelerate's launcher default: under FSDP a rank has no reason to hold the whole base,
    and false stays available to load through transformers (checkpoints this loader cannot read: .bin files,
    renamed keys). The variable then reads false: transformers' from_pretrained acts on it too, building every
    other model it loads (a reward model) empty on ranks > 0 for accelerator.prepare to broadcast into, which
    pefrl never calls. The launcher's value stays in PEFRL_FSDP_CPU_RAM_EFFICIENT_LOADING for later setups.
    """
    value = os.environ.get(CLAIMED) or os.environ.get(VARIABLE, "true")
    os.environ[CLAIMED], os.environ[VARIABLE] = value, "false"
    return value.lower() == "true"


def checkpoint_tensors(model_dir: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a one-file or index-sharded checkpoint."""
    root = Path(model_dir)
    if not root.is_dir():  # a hub name: the cached snapshot (downloaded if online and missing)
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model_dir, allow_patterns=["*.safetensors", INDEX, "*.json"]))
    files = checkpoint_files(root)
    if files is not None:
        return {name: root / f for f in files for name in read_header(root / f)[0]}
    raise FileNotFoundError(f"{model_dir} has no {SINGLE} or {INDEX}: FSDP's sharded loading reads safetensors "
                            "only; set fsdp_config.fsdp_cpu_ram_efficient_loading: false to load it through "
                            "transformers (every rank then holds the whole base while loading)")


def shard_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """Rows [start, end) of dim 0 this rank holds of an FSDP2-sharded parameter; None for a plain (replicated) one.

    FSDP2 places Shard(0) with torch.chunk's split: ceil(n / world) rows per rank, the last ranks short or empty
    (their padding is FSDP's, invisible in to_local())."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return None
    if tuple(param.placements) != (Shard(0),):
        raise NotImplementedError(f"sharded loading expects FSDP2's Shard(0) placement, got {param.placements}")
    n, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    per = -(-n // world)
    start = min(rank * per, n)
    end = min(start + per, n)
    if param.to_local().shape[0] != end - start:  # the split changed under us: never fill the wrong rows
        raise RuntimeError(f"rank {rank} holds {param.to_local().shape[0]} rows of {n}, expected {end - start}")
    return start, end


def checkpoint_name(name: str, keys: dict, prefix: str) -> str:
    """The checkpoint's name of parameter `name` of the peft-wrapped LM (its '.base_layer' dropped), with or without
    the base model prefix ('model.', 'transformer.'), which older checkpoints omit."""
    name = name.replace(".base_layer.", ".")
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if candidate in keys:
            return candidate
    raise KeyError(f"{name} is not in the checkpoint; set fsdp_config.fsdp_cpu_ram_efficient_loading: false to "
                   "load this base through transformers (which renames legacy keys)")


@torch.no_grad()
def fill_from_checkpoint(lm: nn.Module, model_dir: str, skip: set[nn.Parameter]) -> None:
    """Fill every parameter of `lm` not in `skip` (the adapters) from the checkpoint, once per tied group.

    A sharded parameter (DTensor) gets its rows written into its local shard; a replicated one, still a stand-in,
    is replaced by the whole tensor read from the file (under every name it is tied to). Each read opens and closes
    the file, so only one tensor's pages are mapped at a time (they count in a rank's RSS while mapped).
    """
    keys = checkpoint_tensors(model_dir)
    prefix = getattr(lm, "base_model_prefix", "model")
    filled: dict[nn.Parameter, nn.Parameter] = {}  # the parameter as built -> as filled (itself when sharded)
    for module_name, module in lm.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is None or p in skip:
                continue
            if p not in filled:
                key = checkpoint_name(f"{module_name}.{attr}".lstrip("."), keys, prefix)
                filled[p] = _read_into(p, key, keys[key])
            module._parameters[attr] = filled[p]
    left = [n for n, p in lm.named_parameters() if p not in skip and is_stand_in(p)]
    if left:
        raise RuntimeError(f"sharded loading left {left[:3]} unfilled")


def _read_into(p: nn.Parameter, key: str, file: Path) -> nn.Parameter:
    rows = shard_rows(p)
    with safe_open(str(file), framework="pt") as f:
        stored = f.get_slice(key)
        shape = list(stored.get_shape())
        if shape != list(p.shape):
            raise ValueError(f"checkpoint {key} has shape {shape}, the model's parameter {list(p.shape)}")
        if rows is not None:
            p.to_local().copy_(stored[rows[0]: rows[1]])  # (end - start, ...): this rank's rows only
            return p
        # a copy in this process's memory: safetensors may hand back a view of its file mapping, whose pages would
        # then be faulted in (and copied on a write) wherever the trainer first touches them, not here
        whole = stored[:].to(p.dtype, copy=True)
    return nn.Parameter(whole, requires_grad=False)
