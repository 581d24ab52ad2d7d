"""Failing together: an exception on one rank ends every rank, naming the rank, instead of a hang.

Without this, a rank whose reward function raises leaves the loop while the others wait in the next all-reduce
until the process-group timeout (30 minutes by default). `RankGuard` wraps the stages that run user code
(prompts, generation, rewards, environments): at the end of the block every rank all-reduces one flag per rank
(cheap: `world` floats), so all ranks learn together whether any failed, before any other collective of the step.

    with RankGuard(accelerator, step):
        ...                      # stages 1-3; an exception here is recorded, then raised on every rank

The failing rank raises `RankError` chained to its own exception (its traceback names the sample); the other ranks
raise `RankError` naming the failed rank(s). Failures outside the guarded block fall back on the launcher:
torchrun / `accelerate launch` stops all workers when one exits non-zero.
"""

from __future__ import annotations

import os
from types import TracebackType

import torch

from pefrl.errors import PefrlError


class RankError(PefrlError, RuntimeError):
    """Some rank failed during a step; the message names it."""


def failed_ranks(flags: torch.Tensor) -> list[int]:
    """Ranks whose flag is set. flags: (world,) after the all-reduce."""
    return [int(r) for r in (flags > 0).nonzero().flatten()]


class RankGuard:
    """Context manager: exchange a per-rank failure flag on exit; raise on every rank if any rank failed."""

    def __init__(self, accelerator, step: int):
        self.accelerator, self.step = accelerator, step

    def __enter__(self) -> RankGuard:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        acc = self.accelerator
        rank, world = acc.process_index, acc.num_processes
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt / SystemExit: leave as is
        if world == 1:
            return False
        flags = torch.zeros(world, device=acc.device)
        flags[rank] = float(exc is not None)
        torch.distributed.all_reduce(flags)
        failed = failed_ranks(flags.cpu())
        if exc is not None:
            others = [r for r in failed if r != rank]
            also = f" (ranks {others} failed too)" if others else ""
            raise RankError(f"rank {rank} failed at step {self.step}{also}: {type(exc).__name__}: {exc}") from exc
        if failed:
            raise RankError(f"rank {failed[0] if len(failed) == 1 else failed} failed at step {self.step} "
                            f"(its error is in its own log); stopping rank {rank} too")
        return False


REFUSED = ("DEEPSPEED", "MEGATRON_LM")


def check_supported(accelerator) -> None:
    """Stop under DeepSpeed / Megatron-LM instead of silently running unsharded.

    The trainer does not pass the model through `accelerator.prepare`: it replicates the base (DDP semantics,
    averaging adapter gradients itself) or, under FSDP, shards the base itself (pefrl/fsdp.py). A DeepSpeed
    config would shard nothing, and every rank would still need the whole base in memory; docs/distributed.md
    says what was validated of DeepSpeed and what it would need.
    """
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    # On CPU accelerate reports MULTI_CPU even under a DeepSpeed config; the launcher's variable still says it
    kind = next((k for k in REFUSED if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"), kind)
    if kind in REFUSED:
        raise NotImplementedError(
            f"accelerate distributed_type {kind} is not supported by pefrl's trainer yet: it would not shard the "
            "base. Use recipes/accelerate/fsdp.yaml (the base sharded) or ddp.yaml (the base replicated; with "
            "model.quantization=4bit if it does not fit one GPU); see docs/distributed.md"
        )
