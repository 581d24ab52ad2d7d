"""Stage 6's optimizer service: what happens between a minibatch's backward passes and the next one.

`Updater` owns the trained parameters, the optimizer and the scheduler, and is the narrow service handed to
an algorithm (never the trainer's state): `step()` averages gradients over ranks, clips, and steps, skipping
any step whose gradient or resulting parameters are not finite; `minibatches(...)` is the shared
epochs x minibatches x micro-batches loop every gradient update runs (the default one in pefrl/update.py and
TRPO's critic half alike). Imports nothing from pefrl: the callers hand it tensors and callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Updater:
    """The trained parameters' optimizer step, the same on every rank (see the module docstring)."""

    params: list[torch.nn.Parameter]  # every parameter the optimizer holds: adapters and value head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    world: int = 1  # processes whose gradients are averaged before each step
    max_grad_norm: float = 0.0  # 0: no clipping

    def mean_over_ranks(self, x: Tensor) -> Tensor:
        """A flat tensor averaged over ranks (one all-reduce); x itself when there is one rank."""
        if self.world > 1:
            x = x.clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return x

    def step(self, params: Sequence[torch.nn.Parameter] | None = None) -> bool:
        """Average the grads of `params` (default: all) over ranks, clip, step the optimizer and the scheduler.

        A non-finite gradient norm skips the step (grads dropped, parameters untouched). A step that leaves a
        parameter non-finite (an inf learning rate, an overflow inside AdamW) is undone: parameters and their
        optimizer state are put back bit for bit and the scheduler does not advance. -> whether it stepped.
        Parameters outside `params` keep grad None, so AdamW leaves them, their moments and weight decay alone."""
        params = list(self.params if params is None else params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world > 1:
            flat = self.mean_over_ranks(torch.cat([g.flatten() for g in grads]))  # one all-reduce for all grads
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
                offset += g.numel()
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        saved = [(p.detach().clone(), {k: v.clone() if isinstance(v, Tensor) else v
                                       for k, v in self.optimizer.state.get(p, {}).items()}) for p in params]
        self.optimizer.step()
        if not all(torch.isfinite(p).all() for p in params):
            with torch.no_grad():
                for p, (value, state) in zip(params, saved):
                    p.copy_(value)
                    if state:
                        self.optimizer.state[p] = state
                    else:
                        self.optimizer.state.pop(p, None)
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.scheduler.step()
        return True

    def minibatches(self, n: int, epochs: int, mb_size: int, micro: int,
                    backward: Callable[[Tensor, float], dict[str, Tensor | float]],
                    params: Sequence[torch.nn.Parameter] | None = None,
                    row_weights: Tensor | None = None) -> dict[str, float]:
        """epochs x minibatches of `step(params)`, each minibatch (a random permutation of range(n) cut in
        mb_size rows) split in micro-batches of `micro` rows for memory. backward(idx, weight) runs one
        micro-batch's forward and backward of loss * weight (its share of the minibatch) and returns its stats.
        The share counts rows, or `row_weights` (n,) where given: a token-mean loss passes each row's token
        count, so the micro-batches' losses add up to the mean over the minibatch's tokens.
        -> the stats averaged over minibatches (micro-batches weighted by rows), plus skipped_updates."""
        totals: dict[str, float] = {}
        count, skipped = 0, 0
        for _ in range(epochs):
            for mb_idx in torch.randperm(n).split(mb_size):
                self.optimizer.zero_grad(set_to_none=True)
                for micro_idx in mb_idx.split(micro):
                    stats = backward(micro_idx, _share(micro_idx, mb_idx, row_weights))
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + float(v) * len(micro_idx) / len(mb_idx)
                count += 1
                skipped += not self.step(params)
        out = {k: v / max(count, 1) for k, v in totals.items()}
        out["skipped_updates"] = float(skipped)
        return out


def _share(micro_idx: Tensor, mb_idx: Tensor, row_weights: Tensor | None) -> float:
    """A micro-batch's share of its minibatch: by rows, or by row_weights (a minibatch weighing 0: by rows)."""
    if len(micro_idx) == len(mb_idx):
        return 1.0  # exactly, whatever the weights
    total = float(row_weights[mb_idx].sum()) if row_weights is not None else 0.0
    if total <= 0:
        return len(micro_idx) / len(mb_idx)
    return float(row_weights[micro_idx].sum()) / total


def passes(cfg, single_update: bool, n: int) -> tuple[int, int, int]:
    """(epochs, minibatch size, micro-batch size) of the update of a rollout of n rows: rl.epochs x
    cfg.minibatch_size, or one step over all n rows for a single-update algorithm (cfg: config.Config)."""
    epochs, mb_size = (1, n) if single_update else (cfg.rl.epochs, cfg.minibatch_size)
    return epochs, mb_size, min(cfg.micro_batch_size, mb_size)
