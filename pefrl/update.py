"""Stage 6, the default update: epochs x minibatches of optimizer steps on an algorithm's `loss`.

Every algorithm without its own `update` (all but TRPO) runs `gradient_update`: the shared minibatch loop of
`Updater.minibatches`, each micro-batch a forward of the policy (and critic) and a backward of its loss share.
"""

from __future__ import annotations

from typing import Any

import torch

from pefrl.algorithms import Algorithm, RolloutBatch, Targets, loss_inputs
from pefrl.config import Config
from pefrl.forward import policy_forward
from pefrl.models import Models
from pefrl.rollout import Rollout
from pefrl.scoring import Critic, micro_inputs
from pefrl.updater import Updater, passes


def update(models: Models, updater: Updater, batch: RolloutBatch, targets: Targets, cfg: Config, kl_coef: float,
           rollout: Rollout, algo: Algorithm) -> dict[str, float]:
    """Stage 6: the algorithm's own update (TRPO: through the same updater), else `gradient_update`."""
    if algo.update is not None:
        return algo.update(models, updater, batch, targets, cfg, kl_coef, rollout)
    return gradient_update(models, updater, batch, targets, cfg, kl_coef, rollout, algo)


def gradient_update(models: Models, updater: Updater, batch: RolloutBatch, targets: Targets, cfg: Config,
                    kl_coef: float, rollout: Rollout, algo: Algorithm) -> dict[str, float]:
    """Epochs x minibatches of optimizer steps; each minibatch is split into micro-batches for memory. The first
    micro-batch reuses `batch.values_graph` (the critic's values of every row with their graph) when it is set:
    that micro-batch then holds every row (scoring._values_for_one_pass)."""
    tensors = loss_inputs(batch, targets)
    critic = Critic.of(models) if algo.uses_critic else None
    values_graph = [batch.values_graph]  # one use: later passes see updated parameters

    def backward(micro_idx: torch.Tensor, scale: float) -> dict[str, Any]:
        ids, _, P, _ = inputs = micro_inputs(rollout, micro_idx)
        T = ids.shape[1] - P
        mb = {k: v[micro_idx, :T] for k, v in tensors.items()}  # (b, T) trimmed like the inputs
        values = values_graph[0][micro_idx] if values_graph[0] is not None else None  # (n, T) in this order
        values_graph[0] = None
        return micro_backward(models, algo, critic, mb, inputs, cfg, kl_coef, scale, values)

    n = len(batch.response_mask)
    # token_mean (DAPO's token-level loss): each micro-batch's mean over its own tokens, weighted by its share of
    # the minibatch's tokens, is the mean over the minibatch's tokens; the other modes weigh by rows
    tokens = batch.response_mask.sum(-1) if cfg.rl.loss_aggregation == "token_mean" else None  # (n,)
    return updater.minibatches(n, *passes(cfg, algo.single_update, n), backward, row_weights=tokens)


def micro_backward(models: Models, algo: Algorithm, critic: Critic | None, mb: dict[str, torch.Tensor],
                   inputs: tuple, cfg: Config, kl_coef: float, scale: float,
                   values: torch.Tensor | None = None) -> dict[str, Any]:
    """Forward, loss and backward (loss * scale) of one micro-batch -> its stats. values: the critic adapter's
    values of these rows with their graph, when already computed (scoring._values_for_one_pass).

    With a critic adapter the critic runs and backpropagates first, and its graph is freed before the policy's
    forward: the policy and value terms touch disjoint parameters and the advantages are fixed, so two backward
    passes give the gradients of one at about half the activation memory. The critic pass sees the old logprobs
    (and zero entropy) as detached stand-ins, so no gradient reaches the policy; the policy pass sees the values
    detached. Its stats are the run's: every input has its true value there.
    """
    ids, mask, P, critic_inputs = inputs
    loss_args = (cfg.rl, kl_coef, cfg.max_policy_tokens)
    if critic is not None and not critic.shared:
        values = critic.values(models, ids, mask, P, critic_inputs) if values is None else values  # (b, T)
        loss, _ = algo.loss(mb, mb["logprobs"], values, torch.zeros_like(values), *loss_args)
        (loss * scale).backward()
        values = values.detach()
    logprobs, entropy, shared_values = policy_forward(models, ids, mask, P, cfg.rollout.temperature,
                                                      with_values=critic is not None and critic.shared,
                                                      chunk_size=cfg.model.logits_chunk_size,
                                                      with_entropy=cfg.rl.entropy_coef > 0)
    if entropy is None:  # no bonus, so no (b, T, V) softmax passes for it; the step logs the sampling entropy
        entropy = torch.zeros_like(logprobs)
    loss, stats = algo.loss(mb, logprobs, values if values is not None else shared_values, entropy, *loss_args)
    (loss * scale).backward()
    return stats
