"""TRPO: conjugate gradient, Fisher-vector products, the trust region and the line search on a tiny model."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from pefrl.algorithms import trpo
from pefrl.algorithms import RolloutBatch, Targets
from pefrl.config import LoraConfig, ModelConfig, RLConfig
from pefrl.config_loader import load_config
from pefrl.forward import policy_forward
from pefrl.models import load_models
from pefrl.ops.advantages import masked_mean
from pefrl.tiny import save_tiny_model
from pefrl.updater import Updater
from pefrl.algorithms.trpo import (
    PolicyBatch,
    conjugate_gradient,
    fisher_vector_product,
    kl_old_new,
    natural_gradient_step,
    policy_parameters,
    surrogate,
)

torch.set_num_threads(1)
MASK = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0], [1.0] * 2 + [0.0] * 3])  # (4, 5)


# --- pure math ------------------------------------------------------------------------------------------------


def test_conjugate_gradient_solves_a_2x2_spd_system_in_two_iterations():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=2)
    # A^-1 = [[3, -1], [-1, 4]] / 11  ->  x = [3 - 2, -1 + 8] / 11 = [1/11, 7/11]
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))
    one = conjugate_gradient(lambda v: A @ v, b, iters=1)  # one step: along b with alpha = b'b / b'Ab = 5/20
    torch.testing.assert_close(one, 0.25 * b)


def test_conjugate_gradient_on_a_random_spd_system_and_zero_right_hand_side():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: A @ v, b, iters=6), torch.linalg.solve(A, b))
    calls = []
    x = conjugate_gradient(lambda v: calls.append(v) or A @ v, torch.zeros(6, dtype=torch.float64), iters=6)
    assert (x == 0).all() and not calls  # residual 0 at the start: no product is ever asked for


def test_surrogate_and_kl_by_hand():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    new = old + torch.tensor([[0.1, 0.0], [-0.2, 5.0]])  # the 5.0 sits on padding and must not count
    adv = torch.tensor([[1.0, 2.0], [-1.0, 9.0]])
    e = torch.e
    # ratio * A over the 3 real tokens: [e^0.1, 2, -e^-0.2]
    expected = (e**0.1 + 2.0 - e**-0.2) / 3
    assert surrogate(new, old, adv, mask, "token_mean", 2).item() == pytest.approx(expected, rel=1e-6)
    # k3 = (r - 1) - log r per token: r = e^0.1, 1, e^-0.2
    k3 = (e**0.1 - 1 - 0.1) + 0.0 + (e**-0.2 - 1 + 0.2)
    assert kl_old_new(new, old, mask).item() == pytest.approx(k3 / 3, rel=1e-5)


def test_batch_share_makes_micro_batch_sums_equal_the_whole_batch():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for mode in ("token_mean", "sequence_mean", "fixed_length"):
        whole = trpo.aggregate(x, MASK, mode, 6)
        parts = sum(trpo.batch_share(MASK[i], MASK, mode) * trpo.aggregate(x[i], MASK[i], mode, 6)
                    for i in (slice(0, 1), slice(1, 4)))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), mode


# --- tiny model -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=2)


def _models(model_dir, critic="adapter"):
    torch.manual_seed(0)
    models = load_models(ModelConfig(name_or_path=model_dir, critic=critic), LoraConfig(r=4), uses_critic=True)
    with torch.no_grad():  # LoRA B starts at 0, which makes every A-direction of the Fisher 0; move off it
        for p in policy_parameters(models):
            p.add_(0.3 * torch.randn_like(p))
    return models


def _policy_batch(models, micro_batch_size=4, seed=0, chunk_size=None) -> PolicyBatch:
    g = torch.Generator().manual_seed(seed)
    P = 3
    ids = torch.randint(3, 300, (4, P + 5), generator=g)  # (B, P + T)
    attention = torch.cat([torch.ones(4, P), MASK], 1).long()
    with torch.no_grad():
        lp, _, _ = policy_forward(models, ids, attention, P, 1.0)
    return PolicyBatch(input_ids=ids, attention_mask=attention, prompt_len=P, response_mask=MASK,
                       behaviour_logprobs=lp * MASK, advantages=torch.randn(4, 5, generator=g) * MASK,
                       micro_batch_size=micro_batch_size, temperature=1.0, max_len=5, old_logprobs=lp * MASK,
                       chunk_size=chunk_size)


def _per_token_jacobian(models, params, pb):
    """(N, D): the gradient of log pi of each real response token, one backward per token."""
    lp, _, _ = policy_forward(models, pb.input_ids, pb.attention_mask, pb.prompt_len, 1.0)
    rows = []
    for b, t in MASK.nonzero().tolist():
        grads = torch.autograd.grad(lp[b, t], params, retain_graph=True, allow_unused=True)
        rows.append(trpo._flat(grads, params))
    return torch.stack(rows)


@pytest.mark.parametrize("micro_batch_size,chunk_size", [(4, None), (3, 7)])  # 7: chunks straddle rows
def test_fvp_equals_explicit_fisher_times_v_at_the_old_policy(model_dir, micro_batch_size, chunk_size):
    models = _models(model_dir)
    params = policy_parameters(models)
    pb = _policy_batch(models, micro_batch_size, chunk_size=chunk_size)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(3))
    fvp = fisher_vector_product(models, params, pb, v)
    # Hessian of the token-mean k3 KL at pi = pi_old is (1/N) J'J, J the per-token score Jacobian (N, D)
    J = _per_token_jacobian(models, params, pb)
    explicit = J.T @ (J @ v) / J.shape[0]
    assert explicit.abs().max() > 1e-3  # a real, non-zero product
    # float32 and the two attention kernels (old logprobs: fused; FVP: math) differ in the last bits
    assert ((fvp - explicit).norm() / explicit.norm()).item() < 1e-4
    # the kept KL-gradient graphs give the same products, again and again (what CG does with them)
    kl_grads = [trpo.kl_gradient(models, params, pb, idx) for idx in pb.micro_batches()]
    for _ in range(2):
        torch.testing.assert_close(fisher_vector_product(models, params, pb, v, kl_grads), fvp)


def test_fvp_away_from_the_old_policy_matches_finite_differences_of_the_kl_gradient(model_dir):
    models = _models(model_dir)
    params = policy_parameters(models)
    pb = _policy_batch(models)
    flat0 = trpo._flat([p.detach().clone() for p in params], params)
    g = torch.Generator().manual_seed(4)
    trpo._set_flat(params, flat0 + 0.05 * torch.randn(flat0.shape, generator=g))  # pi != pi_old: a real Hessian
    v = torch.randn(flat0.shape, generator=g)
    v /= v.norm()  # unit direction: the finite difference below moves the parameters by eps in norm
    fvp = fisher_vector_product(models, params, pb, v)
    here = trpo._flat([p.detach().clone() for p in params], params)

    def kl_grad(flat):
        trpo._set_flat(params, flat)
        lp, _, _ = policy_forward(models, pb.input_ids, pb.attention_mask, pb.prompt_len, 1.0)
        return trpo._flat(torch.autograd.grad(kl_old_new(lp, pb.old_logprobs, MASK), params, allow_unused=True),
                          params)

    # central differences: error O(eps^2) (measured 2e-3 at eps = 1e-3, 0.28 at 1e-2: the LoRA curvature is high)
    eps = 1e-3
    fd = (kl_grad(here + eps * v) - kl_grad(here - eps * v)) / (2 * eps)
    assert ((fvp - fd).norm() / fd.norm()).item() < 0.01


def test_an_accepted_step_improves_the_surrogate_and_respects_the_kl_bound_measured(model_dir):
    models = _models(model_dir)
    params = policy_parameters(models)
    pb = _policy_batch(models)
    before = [p.detach().clone() for p in params]
    rl = RLConfig(max_kl=0.01, cg_iters=10, cg_damping=0.1, line_search_steps=10)
    stats = natural_gradient_step(models, params, pb, rl)
    assert stats["trpo_accepted"] == 1.0 and stats["skipped_updates"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    # measure it again from scratch: KL(old || new) over the batch's tokens and the surrogate
    with torch.no_grad():
        lp, _, _ = policy_forward(models, pb.input_ids, pb.attention_mask, pb.prompt_len, 1.0)
    kl = kl_old_new(lp, pb.old_logprobs, MASK).item()
    assert 0.0 < kl <= rl.max_kl
    assert kl == pytest.approx(stats["approx_kl"], rel=1e-4)
    surr_new = surrogate(lp, pb.behaviour_logprobs, pb.advantages, MASK, "token_mean", 5).item()
    surr_old = surrogate(pb.old_logprobs, pb.behaviour_logprobs, pb.advantages, MASK, "token_mean", 5).item()
    assert surr_new > surr_old
    assert surr_new - surr_old == pytest.approx(stats["trpo_improve"], rel=1e-3)


def test_a_rejected_line_search_leaves_the_parameters_bit_identical(model_dir, monkeypatch):
    models = _models(model_dir)
    params = policy_parameters(models)
    pb = _policy_batch(models)
    before = [p.detach().clone() for p in params]
    real_evaluate, moved = trpo.evaluate_policy, []

    def never_better(models_, pb_, rl_, world):  # the surrogate never improves: every candidate is rejected
        obj, kl, lp, ent = real_evaluate(models_, pb_, rl_, world)
        moved.append(any(not torch.equal(a, p) for a, p in zip(before, params)))
        return (obj, kl, lp, ent) if len(moved) == 1 else (obj - 1.0, kl, lp, ent)

    monkeypatch.setattr(trpo, "evaluate_policy", never_better)
    stats = natural_gradient_step(models, params, pb, RLConfig(line_search_steps=4))
    assert moved == [False, True, True, True, True]  # the old point, then 4 candidates that really moved
    assert stats["trpo_accepted"] == 0.0 and stats["approx_kl"] == 0.0
    assert all(torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("critic", ["adapter", "shared"])
def test_trpo_update_moves_policy_by_natural_gradient_and_critic_by_adamw_only(model_dir, critic):
    models = _models(model_dir, critic)
    policy = policy_parameters(models)
    critic = [p for p in models.trainable_parameters() if all(p is not q for q in policy)]
    base = {n: p.detach().clone() for n, p in models.model.named_parameters() if "lora_" not in n}
    pb = _policy_batch(models)
    cfg = load_config(None, ["algo=trpo", "rollout.batch_size=4", "rollout.max_new_tokens=5", "rl.minibatch_size=2"])
    params = models.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    updater = Updater(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      max_grad_norm=cfg.train.max_grad_norm)
    rollout = SimpleNamespace(input_ids=pb.input_ids, attention_mask=pb.attention_mask,
                              query_ids=pb.input_ids[:, : pb.prompt_len])
    batch = RolloutBatch(response_mask=MASK, logprobs=pb.behaviour_logprobs, ref_logprobs=pb.behaviour_logprobs,
                         scores=torch.ones(4), values=torch.zeros(4, 5), num_samples=1)
    targets = Targets(advantages=pb.advantages, returns=torch.ones(4, 5) * MASK, rewards=MASK, stats={})
    before_policy, before_critic = [p.detach().clone() for p in policy], [p.detach().clone() for p in critic]
    stats = trpo.trpo_update(models, updater, batch, targets, cfg, 0.0, rollout)
    assert stats["trpo_accepted"] == 1.0 and stats["skipped_updates"] == 0.0 and stats["value_loss"] > 0
    assert stats["kl_ref"] > 0  # ref_logprobs here are the old policy's, which the step left
    assert any(not torch.equal(a, p) for a, p in zip(before_policy, policy))
    assert any(not torch.equal(a, p) for a, p in zip(before_critic, critic))
    assert all(torch.equal(base[n], p) for n, p in models.model.named_parameters() if "lora_" not in n)
    # AdamW never saw a policy gradient: it holds no state for the policy adapter
    assert all(p not in optimizer.state for p in policy) and all(p in optimizer.state for p in critic)
    assert all(p.grad is None for p in params)


@pytest.mark.slow  # launches two processes through accelerate (20-60 s on 2 cores)
def test_two_ranks_take_the_same_natural_gradient_step(tmp_path):
    """Every rank must accept or reject the same step and end bit-identical: the gradient, every Fisher-vector
    product and the line search's surrogate and KL are averaged over ranks before any decision."""
    from test_distributed import _adapters, _launch

    res = _launch(tmp_path, tmp_path / "run", 2, "algo=trpo", "rollout.batch_size=8", "rl.minibatch_size=4",
                  "rl.cg_iters=4", "train.steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 of 2" in res.stdout and "rank 1 of 2" in res.stdout
    r0, r1 = _adapters(tmp_path / "run" / "rank0"), _adapters(tmp_path / "run" / "rank1")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trpo_accepted"] for r in records] == [1.0, 1.0]
    assert max(r0[k].abs().max().item() for k in r0 if "policy" in k and "lora_B" in k) > 0  # the policy moved


def test_with_a_behaviour_mixture_the_ratio_divides_by_mu_and_the_kl_is_to_pi_old(model_dir):
    """Epsilon-greedy: the surrogate's ratio is pi / mu (importance sampling from the mixture) but the trust
    region is measured from the policy before the step, never from mu."""
    models = _models(model_dir)
    params = policy_parameters(models)
    pb = _policy_batch(models)
    pi_old = pb.old_logprobs.clone()
    pb.behaviour_logprobs = (pi_old - 0.5) * MASK  # mu puts e^-0.5 of pi's probability on these tokens
    pb.old_logprobs = None
    rl = RLConfig(max_kl=0.01)
    stats = natural_gradient_step(models, params, pb, rl)
    torch.testing.assert_close(pb.old_logprobs * MASK, pi_old)  # recomputed from the policy, not taken from mu
    # the objective before the step: ratio pi_old / mu = e^0.5 on every token, times A, token mean
    before = -stats["policy_loss"] - stats["trpo_improve"]
    assert before == pytest.approx(math.exp(0.5) * masked_mean(pb.advantages, MASK).item(), rel=1e-4)
    with torch.no_grad():
        lp, _, _ = policy_forward(models, pb.input_ids, pb.attention_mask, pb.prompt_len, 1.0)
    assert stats["trpo_accepted"] == 1.0
    assert 0.0 < kl_old_new(lp, pi_old, MASK).item() <= rl.max_kl  # measured against pi_old: inside the bound
    assert kl_old_new(lp, pb.behaviour_logprobs, MASK).item() > rl.max_kl  # against mu it would be far outside
