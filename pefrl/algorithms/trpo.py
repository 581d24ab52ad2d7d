"""TRPO on LoRA adapters: one natural-gradient step of the policy adapter per rollout batch (Schulman et al. 2015).

    maximise  L(theta) = E_t[ pi_theta(a_t) / mu(a_t) * A_t ]   s.t.  mean_t KL(pi_old || pi_theta) <= max_kl

1. g  = grad L at theta_old over the whole batch (every micro-batch; averaged over ranks)
2. x  = F^-1 g by conjugate gradient, F v = Hessian of the mean KL(pi_old || pi_theta) times v (double backprop)
3. full step = sqrt(2 max_kl / x'(F + damping I)x) * x: the step along x whose quadratic KL model is max_kl
4. backtracking line search: fractions 1, 1/2, 1/4, ... of it (rl.line_search_steps tries); the first one whose
   surrogate improves AND whose measured KL <= max_kl is kept; if none is, the old parameters are put back.
5. the critic (its adapter + value head, or the value head alone with a shared critic) is trained with the
   run's AdamW on the clipped value loss, rl.epochs x rl.minibatch_size, like PPO's value half.

Only the policy adapter's LoRA matrices take the natural-gradient step: they are few (the Fisher is never built,
only products with it), and the frozen base is what keeps TRPO practical for an LLM.

The KL is the sample estimate over the response tokens, k3 = (r - 1) - log r with r = pi_theta / pi_old
(Schulman 2020, "Approximating KL"; the `approx_kl` of the PPO losses). Its Hessian at theta_old is exactly
the empirical Fisher mean_t grad log pi(a_t) grad log pi(a_t)^T (the grad^2 log pi terms cancel at r = 1), so
F is positive semi-definite and conjugate gradient applies; the same estimate is what the line search bounds.
mu is the behaviour distribution (pi_old, or the epsilon-greedy mixture whose logprobs the rollout recorded);
pi_old in the KL is always the policy itself before the step.

Second derivatives: the fused SDPA kernels (CPU flash, CUDA flash / memory-efficient) have no double backward,
so the KL-gradient forward runs with PyTorch's math attention backend (sdpa_kernel(MATH)). A model loaded with
attn_implementation='flash_attention_2' ignores that and cannot run TRPO.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from pefrl.algorithms.base import Algorithm, RolloutBatch, Targets, common_stats
from pefrl.algorithms.ppo import gae_targets
from pefrl.config import Config, RLConfig
from pefrl.forward import critic_values, policy_forward
from pefrl.models import POLICY, Models, lora_parameters
from pefrl.ops.advantages import masked_mean
from pefrl.ops.kl import kl_estimate
from pefrl.ops.losses import aggregate, clipped_value_loss, entropy_bonus

Reduce = Callable[[Tensor], Tensor]  # a flat tensor averaged over ranks (Updater.mean_over_ranks)


def _local(x: Tensor) -> Tensor:
    return x


# --- pure math ----------------------------------------------------------------------------------------------


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-10) -> Tensor:
    """Approximately solve F x = b for symmetric positive-definite F given only v -> F v (Hestenes & Stiefel
    1952; TRPO appendix C, as in OpenAI baselines' cg). Starts at x = 0; stops early once r'r < tol."""
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - F x
    p = b.clone()  # search direction
    rr = r.dot(r)
    for _ in range(iters):
        if rr < tol:
            break
        Fp = fvp(p)
        alpha = rr / p.dot(Fp)
        x += alpha * p
        r -= alpha * Fp
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def surrogate(logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
              aggregation: str, max_len: int) -> Tensor:
    """TRPO's surrogate objective E[pi/mu * A] (Schulman et al. 2015, eq. 14), to MAXIMISE; all inputs (B, T).

    Unclipped: the trust region, not a clip, bounds the step. The ratio to the behaviour logprobs is the
    importance-sampling correction when sampling was not from the policy (epsilon-greedy)."""
    ratio = torch.exp((logprobs - behaviour_logprobs) * response_mask)  # (B, T); masked first: exp never sees pad
    return aggregate(ratio * advantages.detach(), response_mask, aggregation, max_len)


def kl_old_new(logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """Token-mean k3 estimate of KL(pi_old || pi_new) from tokens sampled by pi_old: (r - 1) - log r,
    r = pi_new / pi_old. Zero with zero gradient at pi_new = pi_old; Hessian there = empirical Fisher."""
    log_ratio = (logprobs - old_logprobs) * response_mask  # (B, T)
    return masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, response_mask)


def batch_share(mb_mask: Tensor, mask: Tensor, aggregation: str) -> float:
    """Weight w such that sum over micro-batches of w * aggregate(micro-batch) == aggregate(whole batch):
    each aggregation is a sum over rows divided by a batch constant (tokens, non-empty rows, or rows)."""
    if aggregation == "token_mean":
        return mb_mask.sum().item() / max(mask.sum().item(), 1.0)
    if aggregation == "sequence_mean":
        return (mb_mask.sum(-1) > 0).sum().item() / max((mask.sum(-1) > 0).sum().item(), 1)
    return mb_mask.shape[0] / mask.shape[0]  # fixed_length: sum / (rows * max_len)


def trpo_loss(mb, new_logprobs, new_values, entropy, cfg: RLConfig, kl_coef: float, max_len: int):
    """The same objective as a first-order loss (the registry's `loss`): -surrogate + vf_coef * value loss -
    entropy bonus. The natural-gradient `update` below does not step on it; it uses its parts."""
    mask = mb["response_mask"]
    pg_loss = -surrogate(new_logprobs, mb["logprobs"], mb["advantages"], mask, cfg.loss_aggregation, max_len)
    vf_loss, vf_stats = clipped_value_loss(new_values, mb["values"], mb["returns"], mask, cfg.value_clip_range)
    ent = entropy_bonus(entropy, mask, cfg.loss_aggregation, max_len)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
    approx_kl = kl_old_new(new_logprobs.detach(), mb["logprobs"], mask)
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "approx_kl": approx_kl, **vf_stats}
    return loss, {**common_stats(mb, new_logprobs, ent), **stats}


# --- parameters as one flat vector --------------------------------------------------------------------------


def policy_parameters(models: Models) -> list[torch.nn.Parameter]:
    """The policy adapter's LoRA matrices: the only parameters the natural-gradient step moves."""
    return lora_parameters(models.model, [POLICY])


def _flat(tensors: list[Tensor | None], params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, params)])


@torch.no_grad()
def _set_flat(params: list[torch.nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()



# --- the update ---------------------------------------------------------------------------------------------


@dataclass
class PolicyBatch:
    """What the natural-gradient step reads: the rollout's sequences and the per-token tensors, all (B, ...)."""

    input_ids: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    prompt_len: int  # P
    response_mask: Tensor  # (B, T)
    behaviour_logprobs: Tensor  # (B, T) mu: the logprobs the ratio divides by (batch.logprobs)
    advantages: Tensor  # (B, T)
    micro_batch_size: int
    temperature: float
    max_len: int  # rollout.max_new_tokens, for fixed_length aggregation
    chunk_size: int | None = None  # model.logits_chunk_size (double backward works through its checkpointing)
    ref_logprobs: Tensor | None = None  # (B, T) reference logprobs, for the kl_ref statistic only
    old_logprobs: Tensor | None = None  # (B, T) pi_old on the sampled tokens, filled at the start of the step

    def micro_batches(self) -> list[Tensor]:
        return list(torch.arange(len(self.input_ids)).split(self.micro_batch_size))


def _forward(models: Models, pb: PolicyBatch, idx: Tensor) -> tuple[Tensor, Tensor, None]:
    """Policy logprobs and entropy (b, T) of micro-batch rows `idx`, with grad when grad is enabled."""
    return policy_forward(models, pb.input_ids[idx], pb.attention_mask[idx], pb.prompt_len, pb.temperature,
                          chunk_size=pb.chunk_size)


def _objective(pb: PolicyBatch, idx: Tensor, logprobs: Tensor, entropy: Tensor, rl: RLConfig) -> Tensor:
    """This micro-batch's share of surrogate + entropy_coef * entropy (the entropy bonus, as the losses have)."""
    mask = pb.response_mask[idx]
    share = batch_share(mask, pb.response_mask, rl.loss_aggregation)
    surr = surrogate(logprobs, pb.behaviour_logprobs[idx], pb.advantages[idx], mask, rl.loss_aggregation, pb.max_len)
    ent = entropy_bonus(entropy, mask, rl.loss_aggregation, pb.max_len)
    return share * (surr + rl.entropy_coef * ent)


def _kl(pb: PolicyBatch, idx: Tensor, logprobs: Tensor) -> Tensor:
    """This micro-batch's share of the token-mean KL(pi_old || pi) over the whole (local) batch."""
    mask = pb.response_mask[idx]
    return batch_share(mask, pb.response_mask, "token_mean") * kl_old_new(logprobs, pb.old_logprobs[idx], mask)


@torch.no_grad()
def evaluate_policy(models: Models, pb: PolicyBatch, rl: RLConfig,
                    reduce: Reduce = _local) -> tuple[float, float, Tensor, Tensor]:
    """(objective, KL(pi_old || pi) or 0 before old_logprobs exist, logprobs (B, T), entropy (B, T)) at the
    current parameters; objective and KL averaged over ranks so that every rank takes the same decision."""
    obj, kl, logprobs, entropy = 0.0, 0.0, [], []
    for idx in pb.micro_batches():
        lp, ent, _ = _forward(models, pb, idx)
        obj += _objective(pb, idx, lp, ent, rl).item()
        kl += _kl(pb, idx, lp).item() if pb.old_logprobs is not None else 0.0
        logprobs.append(lp)
        entropy.append(ent)
    both = reduce(torch.tensor([obj, kl], dtype=torch.float64, device=pb.input_ids.device))
    return both[0].item(), both[1].item(), torch.cat(logprobs), torch.cat(entropy)


def surrogate_gradient(models: Models, params: list[torch.nn.Parameter], pb: PolicyBatch, rl: RLConfig) -> Tensor:
    """Flat gradient of the objective over the whole local batch, micro-batch by micro-batch."""
    g = None
    for idx in pb.micro_batches():
        lp, ent, _ = _forward(models, pb, idx)
        grads = torch.autograd.grad(_objective(pb, idx, lp, ent, rl), params, allow_unused=True)
        g = _flat(grads, params) if g is None else g + _flat(grads, params)
    return g


def kl_gradient(models: Models, params: list[torch.nn.Parameter], pb: PolicyBatch, idx: Tensor) -> Tensor:
    """Flat d KL(pi_old || pi_theta) / d theta of micro-batch `idx` (its share of the batch mean), with its graph
    kept (create_graph) for the second backward."""
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        lp, _, _ = _forward(models, pb, idx)
        return _flat(torch.autograd.grad(_kl(pb, idx, lp), params, create_graph=True, allow_unused=True), params)


def fisher_vector_product(models: Models, params: list[torch.nn.Parameter], pb: PolicyBatch, v: Tensor,
                          kl_grads: list[Tensor] | None = None) -> Tensor:
    """F v = d/dtheta [ (d KL(pi_old || pi_theta) / dtheta) . v ] at the current theta (Pearlmutter 1994's
    double backprop; TRPO appendix C); no damping here. `kl_grads`: one kl_gradient per micro-batch, kept
    for reuse (one backward per product); None: each micro-batch's is rebuilt and dropped (a forward and two
    backwards, one micro-batch's graph alive at a time)."""
    out = torch.zeros_like(v)
    for i, idx in enumerate(pb.micro_batches()):
        kl_grad = kl_grads[i] if kl_grads is not None else kl_gradient(models, params, pb, idx)
        hv = torch.autograd.grad(kl_grad.dot(v), params, retain_graph=kl_grads is not None, allow_unused=True)
        out += _flat(hv, params)
    return out


def natural_gradient_step(models: Models, params: list[torch.nn.Parameter], pb: PolicyBatch, rl: RLConfig,
                          reduce: Reduce = _local) -> dict[str, float]:
    """Steps 1-4 of the module docstring on `params`; returns stats. On rejection (or a non-finite gradient)
    the parameters are put back bit for bit."""
    saved = [p.detach().clone() for p in params]
    old_flat = _flat(saved, params)
    obj_old, _, old_logprobs, entropy = evaluate_policy(models, pb, rl, reduce)
    pb.old_logprobs = old_logprobs
    stats = {"policy_loss": -obj_old, "entropy": masked_mean(entropy, pb.response_mask).item(), "approx_kl": 0.0,
             "trpo_accepted": 0.0, "trpo_step_fraction": 0.0, "trpo_improve": 0.0, "trpo_expected_improve": 0.0,
             "skipped_updates": 0.0, **_kl_ref(pb, old_logprobs)}

    # 1. surrogate gradient, averaged over ranks
    g = reduce(surrogate_gradient(models, params, pb, rl))
    stats["trpo_grad_norm"] = g.norm().item()
    if not torch.isfinite(g).all():
        stats["skipped_updates"] = 1.0  # nothing moved yet
        return stats

    # 2. natural-gradient direction x = (F + damping I)^-1 g; the damping keeps CG stable where F is singular.
    # One micro-batch: its KL-gradient graph serves all cg_iters + 1 products (rebuilding it each time would
    # peak at the same memory); several: rebuilt per product, so only one micro-batch's graph is ever alive.
    batches = pb.micro_batches()
    kl_grads = [kl_gradient(models, params, pb, batches[0])] if len(batches) == 1 else None

    def fvp(v: Tensor) -> Tensor:
        return reduce(fisher_vector_product(models, params, pb, v, kl_grads)) + rl.cg_damping * v

    x = conjugate_gradient(fvp, g, rl.cg_iters)
    xFx = x.dot(fvp(x))
    del kl_grads  # frees the graph before the line search
    if not (torch.isfinite(xFx) and xFx > 0):
        stats["skipped_updates"] = 1.0
        return stats

    # 3. scale to the trust region: 0.5 s'(F + damping I)s = max_kl (the quadratic model of the KL)
    full_step = math.sqrt(2.0 * rl.max_kl / xFx.item()) * x
    stats["trpo_expected_improve"] = g.dot(full_step).item()  # first-order prediction of the improvement

    # 4. backtracking line search on the real surrogate and the measured KL
    for i in range(rl.line_search_steps):
        fraction = 0.5**i
        _set_flat(params, old_flat + fraction * full_step)
        obj, kl, logprobs, _ = evaluate_policy(models, pb, rl, reduce)
        if math.isfinite(obj) and math.isfinite(kl) and obj > obj_old and kl <= rl.max_kl:
            stats.update(trpo_accepted=1.0, trpo_step_fraction=fraction, trpo_improve=obj - obj_old,
                         approx_kl=kl, policy_loss=-obj, **_kl_ref(pb, logprobs))
            return stats
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return stats


def _kl_ref(pb: PolicyBatch, logprobs: Tensor) -> dict[str, float]:
    # token-mean k3 KL of the policy to the reference, the kl_ref the other algorithms' losses report
    if pb.ref_logprobs is None:
        return {}
    return {"kl_ref": masked_mean(kl_estimate(logprobs, pb.ref_logprobs, "k3"), pb.response_mask).item()}


def critic_update(models: Models, updater: Any, batch: RolloutBatch, targets: Targets, cfg: Config,
                  rollout: Any) -> dict[str, float]:
    """rl.epochs x minibatches of AdamW steps on the clipped value loss (PPO's value half; vf_coef unused: the
    value loss has its own steps), through the updater's shared minibatch loop. Gradients go to the critic
    adapter + value head only (autograd.grad on them), never the policy, whose grads stay None so AdamW leaves
    it, its moments and its weight decay alone."""
    policy_ids = {id(p) for p in policy_parameters(models)}
    params = [p for p in updater.params if id(p) not in policy_ids]
    mask = batch.response_mask
    input_ids, attention_mask, P = rollout.input_ids, rollout.attention_mask, rollout.query_ids.shape[1]

    def backward(idx: Tensor, weight: float) -> dict[str, float]:
        values = critic_values(models, input_ids[idx], attention_mask[idx], P)  # (b, T)
        loss, _ = clipped_value_loss(values, batch.values[idx], targets.returns[idx], mask[idx],
                                     cfg.rl.value_clip_range)
        for p, g in zip(params, torch.autograd.grad(loss * weight, params, allow_unused=True)):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        return {"value_loss": loss.item()}

    micro = min(cfg.micro_batch_size, cfg.minibatch_size)
    stats = updater.minibatches(len(mask), cfg.rl.epochs, cfg.minibatch_size, micro, backward, params)
    for p in params:
        p.grad = None
    return {"value_loss": stats.get("value_loss", 0.0), "critic_skipped": stats["skipped_updates"]}


def trpo_update(models: Models, updater: Any, batch: RolloutBatch, targets: Targets, cfg: Config, kl_coef: float,
                rollout: Any) -> dict[str, float]:
    """The `Algorithm.update` of trpo: a natural-gradient step of the policy adapter, then the critic's steps.
    updater: the loop's optimizer service (pefrl/updater.py: mean_over_ranks, minibatches, params)."""
    pb = PolicyBatch(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                     prompt_len=rollout.query_ids.shape[1], response_mask=batch.response_mask,
                     behaviour_logprobs=batch.logprobs, advantages=targets.advantages,
                     micro_batch_size=cfg.micro_batch_size, temperature=cfg.rollout.temperature,
                     max_len=cfg.max_policy_tokens, chunk_size=cfg.model.logits_chunk_size,
                     ref_logprobs=batch.ref_logprobs)
    stats = natural_gradient_step(models, policy_parameters(models), pb, cfg.rl, updater.mean_over_ranks)
    stats.update(critic_update(models, updater, batch, targets, cfg, rollout))
    stats["skipped_updates"] += stats.pop("critic_skipped")
    return stats


ALGORITHM = Algorithm("trpo", uses_critic=True, single_update=False, kl_in_reward=True, targets=gae_targets,
                      loss=trpo_loss, update=trpo_update, fsdp_ok=False)
