"""Stage 4: what is still to compute after sampling, without grad: old logprobs, reference logprobs, values.

The sampler may already have scored some of it while generating (`Rollout.logprobs`/`entropy` always, the
reference and the shared critic's values with engine 'pefrl', a top-layers critic's inputs from the reference
rows). `score_rollout` is the one place that knows which: it runs only the forwards still missing and hands the
algorithm a `RolloutBatch`. The loop never asks which engine ran.

`Critic` is the small strategy over the three critic shapes (model.critic / model.critic_layers):
shared       a value head on the policy's last hidden state: its values come with the policy's forward
adapter      its own LoRA adapter + value head: its own forward, and its own backward in the update
top layers   an adapter on the top N layers only: its forward starts from the sampler's hidden states
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pefrl.algorithms import Algorithm, RolloutBatch
from pefrl.config import Config
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import Models
from pefrl.ops.sampling import mask_truncated
from pefrl.rollout import Rollout
from pefrl.updater import passes


@dataclass(frozen=True)
class Critic:
    """Which critic a run trains, and what that means for the sampler, the scoring and the update."""

    shared: bool  # values from the policy's forward (a head on its trunk); else a critic adapter's own forward
    top_layers: bool  # the critic adapter covers the top layers only (its forward starts from critic_inputs)

    @staticmethod
    def of(models: Models) -> Critic | None:
        """The critic of `models`, None when they have none (critic-free algorithm, evaluation)."""
        if models.critic == "none":
            return None
        return Critic(shared=models.critic == "shared", top_layers=models.critic_from is not None)

    def sampler_requests(self) -> dict[str, bool]:
        """What the sampler can score for this critic while generating (rollout.generate's flags)."""
        return {"with_values": self.shared, "with_critic_inputs": self.top_layers}

    def values(self, models: Models, ids: Tensor, mask: Tensor, P: int, critic_inputs: Tensor | None) -> Tensor:
        """The critic adapter's values (b, T) with grad when enabled; the shared critic's come with policy_forward."""
        return critic_values(models, ids, mask, P, critic_inputs)


def sampler_requests(models: Models) -> dict[str, bool]:
    """rollout.generate's flags for a training rollout: everything the sampler can score alongside."""
    critic = Critic.of(models)
    requests = critic.sampler_requests() if critic else {"with_values": False, "with_critic_inputs": False}
    return {"with_reference": True, **requests}


def micro_inputs(rollout: Rollout, idx: Tensor) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """input_ids and attention_mask of rows `idx`, without the columns that are padding in every one of them:
    left-padding of the prompts and right-padding of the responses. -> ids (b, P' + T'), mask, P', and the
    critic's inputs from the sampler trimmed alike (b, P' + T' - 1, H), or None (Rollout.critic_inputs)."""
    P = rollout.query_ids.shape[1]
    attention = rollout.attention_mask[idx]  # (b, P + T); env rollouts attend to observation tokens too
    left = int((attention[:, :P].sum(0) == 0).long().cumprod(0).sum())  # leading all-pad prompt columns
    used = (attention[:, P:].sum(0) > 0).nonzero()
    T = int(used.max()) + 1 if len(used) else 1
    ids = rollout.input_ids[idx, left : P + T]
    critic_inputs = rollout.critic_inputs[idx, left : P + T - 1] if rollout.critic_inputs is not None else None
    return ids, attention[:, left : P + T], P - left, critic_inputs


def score_rollout(models: Models, rollout: Rollout, scores: Tensor, cfg: Config, algo: Algorithm,
                  finished: Tensor | None = None) -> RolloutBatch:
    """The rollout as the algorithm reads it: scores (B,) from stage 3 plus old logprobs, reference logprobs and
    values (B, T), each taken from the sampler where it recorded them and computed here where it did not.
    finished (B,) bool (sampling_loop.finished_rows): with rl.overlong_filter the rows cut off at the length cap
    leave the batch's response_mask, so no loss term sees them (DAPO section 3.4)."""
    critic = Critic.of(models) if algo.uses_critic else None
    values_graph = _values_for_one_pass(models, rollout, cfg, algo, critic)
    batch = _no_grad_pass(models, rollout, scores, cfg, critic, values_graph)
    if cfg.rl.overlong_filter and finished is not None:
        batch.response_mask = mask_truncated(batch.response_mask, finished.to(batch.response_mask.device))
    return batch


def _values_for_one_pass(models: Models, rollout: Rollout, cfg: Config, algo: Algorithm,
                         critic: Critic | None) -> Tensor | None:
    """The critic adapter's values (n, T) of the whole rollout WITH their graph, when the update's first
    micro-batch will be the whole rollout (A2C, or PPO with rl.minibatch_size >= the rollout and no gradient
    accumulation). That micro-batch's critic forward would be this one again (same rows, same parameters), so
    the update reuses this graph instead and the no-grad critic forward is skipped: the old values are these,
    detached, set as `rollout.values`. None (nothing done) in every other case, and for an algorithm with its
    own update (it never reads the graph)."""
    n = len(rollout.response_ids)
    if critic is None or critic.shared or rollout.values is not None or algo.update is not None:
        return None
    if passes(cfg, algo.single_update, n)[2] < n:
        return None
    ids, mask, P, critic_inputs = micro_inputs(rollout, torch.arange(n))
    values = critic.values(models, ids, mask, P, critic_inputs)  # (n, T'), T' <= T, trimmed as in the update
    rollout.values = torch.nn.functional.pad(values.detach(), (0, rollout.response_ids.shape[1] - values.shape[1]))
    return values


@torch.no_grad()
def _no_grad_pass(models: Models, rollout: Rollout, scores: Tensor, cfg: Config, critic: Critic | None,
                  values_graph: Tensor | None) -> RolloutBatch:
    """Old logprobs, reference logprobs and values for the whole rollout, micro-batch by micro-batch.

    The old logprobs and entropy come from generation (`Rollout.logprobs`, recorded while sampling), so the
    policy runs a forward here only where something else needs it: the shared critic's values, or a rollout
    that recorded nothing (multi-turn episodes). Likewise the reference forward runs only where the sampler did
    not score the reference itself (`Rollout.ref_logprobs`, the pefrl engine), and the critic forward only where
    it did not score the values (`Rollout.values`)."""
    temperature, T = cfg.rollout.temperature, rollout.response_ids.shape[1]
    old, ref, values, entropy = [], [], [], []
    shared, chunk = critic is not None and critic.shared, cfg.model.logits_chunk_size
    critic_pass = critic is not None and rollout.values is None
    policy_pass = rollout.logprobs is None or (critic_pass and shared)
    reference_pass = rollout.ref_logprobs is None
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # (b, t) -> (b, T)
    any_pass = policy_pass or reference_pass or critic_pass  # the pefrl engine usually leaves nothing to do
    for idx in torch.arange(len(rollout.response_ids)).split(cfg.micro_batch_size) if any_pass else ():
        ids, mask, P, critic_inputs = micro_inputs(rollout, idx)
        if policy_pass:
            lp, ent, v = policy_forward(models, ids, mask, P, temperature, with_values=critic_pass and shared,
                                        chunk_size=chunk)
            old.append(pad(lp))
            entropy.append(pad(ent))
        if reference_pass:
            ref.append(pad(reference_logprobs(models, ids, mask, P, temperature, chunk_size=chunk)))
        if critic_pass:
            values.append(pad(v if shared else critic.values(models, ids, mask, P, critic_inputs)))
    response_mask = rollout.response_mask
    logprobs, ent = (torch.cat(old), torch.cat(entropy)) if policy_pass else (rollout.logprobs, rollout.entropy)
    policy_logprobs = None
    if rollout.behaviour_logprobs is not None:
        # Epsilon-greedy sampled from a mixture, not from the policy: the ratio must use the behaviour logprobs,
        # the KL to the reference the policy's own.
        policy_logprobs, logprobs = logprobs * response_mask, rollout.behaviour_logprobs
    return RolloutBatch(
        response_mask=response_mask,
        logprobs=logprobs * response_mask,
        policy_logprobs=policy_logprobs,
        ref_logprobs=(torch.cat(ref) if reference_pass else rollout.ref_logprobs) * response_mask,
        scores=scores,
        values=(torch.cat(values) if critic_pass else rollout.values) * response_mask if critic else None,
        num_samples=cfg.rollout.num_samples,
        entropy=ent,
        values_graph=values_graph,
    )
