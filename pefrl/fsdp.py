"""FSDP2: the frozen base sharded over ranks, the LoRA adapters and value head replicated and trained as in DDP.

Applied by `trainer.setup` under an FSDP accelerate config (recipes/accelerate/fsdp.yaml); pefrl shards the model
itself with torch's `fully_shard` (FSDP2) instead of going through `accelerator.prepare`:

    base LM (root, fully_shard)          embeddings, final norm, lm_head: replicated (see shard_models)
      decoder layer 0 (fully_shard)      base weights sharded: each rank keeps 1/N of every matrix
      ...                                LoRA A/B of every adapter: replicated (ignored_params)
      decoder layer L-1 (fully_shard)
    value head                           replicated

Why the adapters are not sharded: they are a few MB, so sharding them (and their AdamW state) saves nothing
that matters, while replicated adapters keep everything after the forward exactly as under DDP: the trainer's
one gradient all-reduce (`Updater.step`), clipping on plain tensors, rank 0 saving `final/` and
checkpoints alone, checkpoints interchangeable between DDP and FSDP runs. The memory that matters, the base, is
sharded. A forward all-gathers one decoder layer at a time and frees it after (reshard_after_forward).

Loading: with fsdp_cpu_ram_efficient_loading (true, or absent: accelerate's default) every rank builds the base
without weights and reads only its shard of each layer from the checkpoint (pefrl/fsdp_load.py), so no rank
ever holds the whole base; with false every rank loads the whole base through transformers, then shards it.

Every forward is a collective under FSDP, so every rank must run the same number of them: generation runs in
transformers' `synced_gpus` mode (a rank whose sequences are done keeps stepping until all ranks are),
micro-batch counts are equal because batch sizes are per rank, and evaluation rows are trimmed to a multiple of
the world size in setup. Multi-turn environments (episodes end after different numbers of turns per rank),
quantized bases and TRPO (double backward through a retained graph) are refused by `check_fsdp`; pefrl's lean
decoder, which reads layer weights directly, by `rollout.use_pefrl_engine` at setup (use rollout.engine=transformers).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pefrl.arch import decoder_layers
from pefrl.config import ConfigError
from pefrl.fsdp_load import fill_from_checkpoint
from pefrl.models import Models, lora_parameters
from pefrl.models.load import is_stand_in


def fsdp_requested(accelerator) -> bool:
    """True when launched with an FSDP accelerate config.

    `accelerate launch` exports ACCELERATE_USE_FSDP=true for such a config; on CUDA the Accelerator then reports
    distributed_type FSDP, but on CPU it reports MULTI_CPU (accelerate only turns GPU types into FSDP), so the
    environment variable is what the two-rank CPU tests see.
    """
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return kind == "FSDP" or (launched and accelerator.num_processes > 1)


UNHONOURED = {
    "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
    "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
}
"""accelerate FSDP settings (launcher variable: yaml key) that pefrl's sharding does not implement.
(fsdp_cpu_ram_efficient_loading is honoured: pefrl/fsdp_load.py.)"""


def check_fsdp(cfg, fsdp_ok: bool) -> None:
    """Config choices FSDP cannot run, in the pefrl config or the accelerate FSDP config: raise naming them.

    fsdp_ok: whether cfg.algo's update can run on a sharded base (the caller asks the algorithm; this module
    does not import the algorithms)."""
    for var, key in UNHONOURED.items():
        if os.environ.get(var, "false").lower() == "true":
            raise ConfigError(f"fsdp_config.{key}: true is not implemented by pefrl's FSDP2 sharding (pefrl/fsdp.py): "
                              "set it to false (for activation checkpointing use model.gradient_checkpointing)")
    if cfg.model.quantization is not None:
        raise ConfigError(f"model.quantization={cfg.model.quantization} with FSDP: bitsandbytes weights cannot be "
                          "sharded by fully_shard; use a quantized base with recipes/accelerate/ddp.yaml instead")
    if cfg.env.name:
        raise ConfigError(f"env.name={cfg.env.name} with FSDP: episodes end after different numbers of turns on "
                          "each rank, and every sharded forward is a collective; use ddp.yaml for environments")
    if not fsdp_ok:
        # TRPO's Fisher-vector products backpropagate again through a retained graph, whose gathered weights
        # FSDP frees after the first backward ("setStorage ... out of bounds for storage of size 0")
        raise ConfigError(f"algo={cfg.algo} with FSDP: its own update loop (double backward through a retained "
                          "graph) does not run on a sharded base; use ddp.yaml")


def adapter_parameters(models: Models) -> set[nn.Parameter]:
    """Every LoRA parameter (trained or frozen adapters) and the value head: what stays replicated."""
    lora = set(lora_parameters(models.model))
    return lora | (set(models.value_head.parameters()) if models.value_head is not None else set())


def shard_models(models: Models, device: torch.device, reshard_after_forward: bool | None = None,
                 checkpoint: str | None = None) -> None:
    """Shard the base over all ranks with FSDP2 (collective: every rank calls it, in setup, before training).

    reshard_after_forward: free each layer's gathered weights after its forward (None: the accelerate config's
    fsdp_reshard_after_forward, default true); false keeps them gathered until the backward (faster, more memory).
    checkpoint: the base's directory (or hub name) when models were loaded without weights (load_models(...,
    weights=False)): each rank then fills only its shard from it (sharded loading, pefrl/fsdp_load.py).

    - each decoder layer is one FSDP unit: its base weights are sharded, its LoRA weights ignored (replicated);
    - the LM itself is the root unit, with its own weights (embeddings, final norm, lm_head) replicated too:
      pefrl calls the trunk and lm_head directly (forward._response_hidden, arch.LogitsHead), outside the root's
      forward, so the root's parameters must be usable without its all-gather hooks. They are ~2 * vocab *
      hidden values; the decoder layers, the bulk of any large model, are sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if reshard_after_forward is None:
        reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    lm = models.model.get_base_model()  # the HF causal LM, LoRA layers injected in place
    replicated = adapter_parameters(models)
    layers = decoder_layers(lm)
    in_layers: set[nn.Parameter] = set()
    for layer in layers:
        if checkpoint is not None:
            _stand_ins_to_meta(layer)
        own = set(layer.parameters())
        in_layers |= own
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=own & replicated)
        if checkpoint is not None:
            _allocate_shards(layer, device)
    if checkpoint is not None:  # before the root's fully_shard: filling replaces the root's stand-ins
        fill_from_checkpoint(lm, checkpoint, skip=replicated)
    root_own = {p for p in lm.parameters() if p not in in_layers}
    fully_shard(lm, mesh=mesh, ignored_params=root_own | replicated)
    lm._is_fsdp_managed_module = True  # transformers' generate then runs synced_gpus: no rank stops stepping early
    _move_unmanaged(lm, replicated | root_own, device)
    _run_root_first(lm, device)


def _stand_ins_to_meta(layer: nn.Module) -> None:
    # fully_shard shards a meta parameter without allocating it (a meta DTensor): no rank ever allocates a whole
    # weight, not even transiently, nor touches pages of other ranks' rows
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and is_stand_in(p):
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                        requires_grad=False)


@torch.no_grad()
def _allocate_shards(layer: nn.Module, device: torch.device) -> None:
    # to_empty allocates this rank's shard of each meta DTensor (FSDP2 re-points its storage: reset_sharded_param),
    # to be filled from the checkpoint; it empties the layer's adapters and buffers too, so keep and restore them
    keep = {name: t.detach() for name, t in [*layer.named_parameters(), *layer.named_buffers()] if not t.is_meta}
    layer.to_empty(device=device)
    params = dict(layer.named_parameters())  # after to_empty: it may have replaced the objects
    for name, old in keep.items():
        (params[name] if name in params else layer.get_buffer(name)).copy_(old)


def _move_unmanaged(lm: nn.Module, params: set[nn.Parameter], device: torch.device) -> None:
    # fully_shard moves the parameters it manages to the mesh's device; the ignored ones and the buffers (rotary
    # inv_freq, ...) are left where they were loaded: move them before the first forward.
    for p in params:
        p.data = p.data.to(device)
    for module in lm.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def _run_root_first(lm: nn.Module, device: torch.device) -> None:
    # FSDP2 makes the unit whose forward runs first the root. pefrl's loop generates first (through the LM), but
    # a direct trunk call first (policy_forward from a custom loop) would make a decoder layer the root and the LM's
    # own forward fail later ("FSDP requires running forward through the root module first"): one token through
    # the LM settles the root now.
    lm(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


def sharded_numel(param: torch.Tensor) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole tensor): equal for a replicated parameter."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel(), param.numel()


def trim_eval_rows(rows: list, world: int) -> list:
    """Evaluation rows cut to a multiple of `world`: evaluation.evaluate gives rank r the rows r::world, and under
    FSDP every rank must run the same number of generate calls (each forward is a collective)."""
    return rows[: len(rows) - len(rows) % world]
