import json
import math

import pytest
import torch

from pefrl.algorithms import ALGORITHMS, Algorithm, RolloutBatch, Targets, get_algorithm, loss_inputs, register
from pefrl.config import RLConfig
from pefrl.ops.advantages import masked_mean, masked_var
from pefrl.ops.losses import clipped_policy_loss

MASK = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4, [1.0] * 4 + [0.0]])  # ragged, B=4, T=5


def random_batch(seed: int = 0, with_values: bool = True) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(4, 5, generator=g) * 3
    ref_logprobs = logprobs + 0.2 * torch.randn(4, 5, generator=g)
    values = torch.randn(4, 5, generator=g)
    return RolloutBatch(response_mask=MASK, logprobs=logprobs * MASK, ref_logprobs=ref_logprobs * MASK,
                        scores=torch.randn(4, generator=g), values=values * MASK if with_values else None,
                        num_samples=2)


def run_step(algo: Algorithm, batch: RolloutBatch, cfg: RLConfig, kl_coef: float, state: dict, seed: int = 1):
    """What the trainer does with an algorithm, and nothing that names one."""
    targets = algo.targets(batch, cfg, kl_coef, state)
    mb = loss_inputs(batch, targets)
    g = torch.Generator().manual_seed(seed)
    new_logprobs = (batch.logprobs + 0.05 * torch.randn(4, 5, generator=g)).requires_grad_()
    new_values = (torch.randn(4, 5, generator=g)).requires_grad_() if algo.uses_critic else None
    entropy = torch.rand(4, 5, generator=g)
    loss, stats = algo.loss(mb, new_logprobs, new_values, entropy, cfg, kl_coef, 6)
    return targets, loss, stats, new_logprobs, new_values


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_and_gives_a_finite_loss_with_grad(name):
    algo = get_algorithm(name)
    state: dict = {}
    for step in range(2):  # twice: stateful targets (reinforce baseline) must work from a non-empty state
        batch = random_batch(step, with_values=algo.uses_critic)
        targets, loss, stats, new_logprobs, new_values = run_step(algo, batch, RLConfig(entropy_coef=0.01), 0.1,
                                                                  state)
        assert isinstance(targets, Targets)
        assert targets.advantages.shape == (4, 5) and targets.rewards.shape == (4, 5)
        assert (targets.advantages[MASK == 0] == 0).all()
        assert (targets.returns is not None) == algo.uses_critic
        assert all(isinstance(v, float) and math.isfinite(v) for v in targets.stats.values())
        json.dumps(state)  # the trainer checkpoints it as JSON
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(new_logprobs.grad).all() and new_logprobs.grad.abs().sum() > 0
        assert (new_logprobs.grad[MASK == 0] == 0).all()
        if algo.uses_critic:
            assert new_values.grad.abs().sum() > 0
        assert {"policy_loss", "value_loss", "entropy", "approx_kl", "kl_ref"} <= set(stats)
        assert (stats["value_loss"] > 0) == algo.uses_critic
        assert all(not v.requires_grad and torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_loss_subtracts_the_entropy_bonus(name):
    algo = get_algorithm(name)
    batch = random_batch(3, with_values=algo.uses_critic)
    _, loss0, stats, _, _ = run_step(algo, batch, RLConfig(entropy_coef=0.0), 0.1, {})
    _, loss1, _, _, _ = run_step(algo, batch, RLConfig(entropy_coef=0.5), 0.1, {})
    assert (loss0 - loss1).item() == pytest.approx(0.5 * stats["entropy"].item(), rel=1e-5)


def test_the_config_accepts_exactly_the_registered_names_and_unknown_ones_list_the_valid():
    from pefrl.config import ConfigError
    from pefrl.config_loader import load_config

    for name in ALGORITHMS:  # every registered name is reachable from a config
        load_config(None, [f"algo={name}", "rollout.num_samples=2"])
    with pytest.raises(ConfigError, match=r"algo must be one of \['a2c', 'cispo', .*got 'ppo2'"):
        load_config(None, ["algo=ppo2"])
    with pytest.raises(ValueError, match=r"unknown algorithm 'ppo2'; valid: \['a2c', 'cispo', 'dapo', 'grpo', 'gspo', 'ppo'"):
        get_algorithm("ppo2")
    with pytest.raises(ValueError, match="already registered"):
        register(ALGORITHMS["ppo"])
    assert get_algorithm("a2c").single_update and not get_algorithm("ppo").single_update
    assert not get_algorithm("grpo").kl_in_reward and get_algorithm("rloo").kl_in_reward


def test_registering_a_new_algorithm_needs_no_other_change():
    def targets(batch, cfg, kl_coef, state):  # "sign": advantage = sign of the score on every token
        adv = torch.sign(batch.scores).unsqueeze(-1) * batch.response_mask
        return Targets(advantages=adv, returns=None, rewards=adv, stats={})

    def loss(mb, new_logprobs, new_values, entropy, cfg, kl_coef, max_len):
        value = -(mb["advantages"] * new_logprobs * mb["response_mask"]).sum()
        return value, {"policy_loss": value.detach()}

    register(Algorithm("sign_pg", uses_critic=False, single_update=True, kl_in_reward=False, targets=targets,
                       loss=loss))
    try:
        algo = get_algorithm("sign_pg")
        _, value, stats, new_logprobs, _ = run_step(algo, random_batch(with_values=False), RLConfig(), 0.1, {})
        value.backward()
        assert torch.isfinite(value) and new_logprobs.grad.abs().sum() > 0
    finally:
        del ALGORITHMS["sign_pg"]


def test_a_registered_algorithm_trains_through_the_unchanged_loop(tmp_path, monkeypatch):
    """A new algorithm is its functions plus one registration (the config accepts its name then): the trainer,
    scoring and the updater run it by its flags alone, with a critic or without."""
    from pefrl.algorithms.ppo import gae_targets, ppo_loss
    from pefrl.config_loader import load_config
    from pefrl.trainer import train

    register(Algorithm("ppo_once", uses_critic=True, single_update=True, kl_in_reward=True, targets=gae_targets,
                       loss=ppo_loss))
    try:
        cfg = load_config(None, ["algo=ppo_once", f"output_dir={tmp_path}", "train.steps=2", "rollout.batch_size=4",
                                 "rl.minibatch_size=4", "data.eval_prompts=", "model.critic=adapter",
                                 "reward.functions=[pefrl.tasks.arithmetic:exact_match]"])
        assert train(cfg)["steps"] == 2
    finally:
        del ALGORITHMS["ppo_once"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(r["value_loss"] > 0 for r in records)


# --- hand-worked targets -------------------------------------------------------------------------------------


def one_row(logprobs, ref_logprobs, score, values=None, mask=None):
    t = lambda x: torch.tensor([x])  # noqa: E731
    mask = t(mask) if mask is not None else torch.ones(1, len(logprobs))
    return RolloutBatch(response_mask=mask, logprobs=t(logprobs), ref_logprobs=t(ref_logprobs),
                        scores=torch.tensor([score]), values=t(values) if values is not None else None,
                        num_samples=1)


def test_ppo_targets_by_hand():
    cfg = RLConfig(gamma=1.0, lam=1.0, whiten_advantages=False, kl_estimator="k1")
    batch = one_row([-1.0, -1.0], [-1.1, -1.2], 1.0, values=[0.0, 0.0])
    targets = get_algorithm("ppo").targets(batch, cfg, 0.5, {})
    # k1 = [0.1, 0.2]; rewards = -0.5 * kl + score on the last token = [-0.05, 0.9]
    torch.testing.assert_close(targets.rewards, torch.tensor([[-0.05, 0.9]]))
    # gamma = lam = 1, values 0: advantages = reward-to-go = [0.85, 0.9], returns = advantages + 0
    torch.testing.assert_close(targets.advantages, torch.tensor([[0.85, 0.9]]))
    torch.testing.assert_close(targets.returns, torch.tensor([[0.85, 0.9]]))
    assert targets.stats["non_score_reward"] == pytest.approx(-0.15)
    whitened = get_algorithm("ppo").targets(batch, RLConfig(gamma=1.0, lam=1.0), 0.5, {})
    torch.testing.assert_close(whitened.returns, targets.returns)  # value targets come from raw advantages
    # [0.85, 0.9] whitened: mean 0.875, unbiased std 0.035355 -> [-1/sqrt(2), 1/sqrt(2)]
    torch.testing.assert_close(whitened.advantages, torch.tensor([[-0.5**0.5, 0.5**0.5]]), atol=1e-4, rtol=0)


def test_ppo_rejects_a_batch_without_values():
    with pytest.raises(ValueError, match="critic values"):
        get_algorithm("ppo").targets(one_row([-1.0], [-1.0], 1.0), RLConfig(), 0.1, {})


def test_reinforce_baseline_uses_the_value_from_before_the_batch():
    algo, cfg, state = get_algorithm("reinforce"), RLConfig(gamma=1.0, baseline_decay=0.9), {}
    mask = torch.ones(2, 1)
    first = RolloutBatch(mask, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([1.0, 3.0]), None, 1)
    targets = algo.targets(first, cfg, 0.1, state)
    # first batch: mean return 2 initializes the baseline and is used -> [-1, 1]; baseline 0.9*2 + 0.1*2 = 2
    torch.testing.assert_close(targets.advantages, torch.tensor([[-1.0], [1.0]]))
    assert state["baseline"] == pytest.approx(2.0)
    second = RolloutBatch(mask, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([4.0, 4.0]), None, 1)
    targets = algo.targets(second, cfg, 0.1, state)
    torch.testing.assert_close(targets.advantages, torch.tensor([[2.0], [2.0]]))  # 4 - old baseline 2
    assert state["baseline"] == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)  # 2.2


def test_rloo_targets_with_sequence_kl_by_hand():
    logprobs = torch.zeros(4, 2)
    ref_logprobs = torch.tensor([[-0.1, -0.1], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # row 0: k1 sum 0.2
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    batch = RolloutBatch(mask, logprobs, ref_logprobs * mask, torch.tensor([1.0, 0.0, 0.0, 1.0]), None, 2)
    targets = get_algorithm("rloo").targets(batch, RLConfig(kl_estimator="k1"), 0.5, {})
    # sequence rewards [1 - 0.5*0.2, 0, 0, 1] = [0.9, 0, 0, 1]; leave-one-out with k=2: [0.9, -0.9, -1, 1]
    expected = torch.tensor([[0.9, 0.9], [-0.9, -0.9], [-1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(targets.advantages, expected)


def test_grpo_keeps_kl_out_of_the_reward_and_in_the_loss():
    algo, cfg = get_algorithm("grpo"), RLConfig(scale_by_std=False)
    batch = random_batch(0, with_values=False)
    far_ref = RolloutBatch(batch.response_mask, batch.logprobs, batch.ref_logprobs - 1.0 * MASK, batch.scores,
                           None, 2)
    a = algo.targets(batch, cfg, 0.1, {}).advantages
    torch.testing.assert_close(a, algo.targets(far_ref, cfg, 0.1, {}).advantages)  # reference does not matter
    s = batch.scores
    torch.testing.assert_close(a[:, 0], torch.stack([(s[0] - s[1]) / 2, (s[1] - s[0]) / 2,
                                                     (s[2] - s[3]) / 2, (s[3] - s[2]) / 2]))
    # the loss: clipped policy loss + kl_coef * token-mean k3; new = ref + 0.1 on the 1-token row only
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    new_logprobs = torch.tensor([[-1.0, -2.0], [-0.9, 0.0]], requires_grad=True)
    mb = {"response_mask": mask, "logprobs": new_logprobs.detach(), "ref_logprobs": ref_logprobs,
          "advantages": torch.zeros(2, 2)}
    loss, stats = algo.loss(mb, new_logprobs, None, torch.zeros(2, 2), cfg, 0.5, 2)
    k3 = math.exp(-0.1) + 0.1 - 1  # 0.0048374
    assert stats["kl_loss"].item() == pytest.approx(k3 / 3, rel=1e-5)  # token mean over 3 tokens
    assert loss.item() == pytest.approx(0.5 * k3 / 3, rel=1e-5)


def test_reinforce_pp_whitens_reward_to_go_over_the_batch():
    batch = random_batch(2, with_values=False)
    targets = get_algorithm("reinforce_pp").targets(batch, RLConfig(), 0.1, {})
    assert masked_mean(targets.advantages, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(targets.advantages, MASK).item() == pytest.approx(1.0, abs=1e-4)
    # order preserved: the row with the highest score-to-go has the highest first-token advantage
    assert targets.advantages[:, 0].argmax() == (targets.rewards * MASK).sum(-1).argmax()


def test_a2c_loss_has_no_ratio_and_no_value_clipping():
    mask = torch.ones(1, 2)
    mb = {"response_mask": mask, "logprobs": torch.tensor([[-1.0, -1.0]]), "ref_logprobs": torch.tensor([[-1.0, -1.0]]),
          "advantages": torch.tensor([[1.0, -2.0]]), "returns": torch.tensor([[3.0, 0.0]]),
          "values": torch.tensor([[0.0, 0.0]])}
    new_logprobs = torch.tensor([[-0.5, -1.5]], requires_grad=True)  # ratio e^0.5 would be clipped by PPO
    new_values = torch.tensor([[1.0, 0.0]], requires_grad=True)  # 1 step from old 0: beyond a 0.2 clip
    cfg = RLConfig(vf_coef=0.5)
    loss, stats = get_algorithm("a2c").loss(mb, new_logprobs, new_values, torch.zeros(1, 2), cfg, 0.1, 2)
    # policy: -w * A * logp with the detached importance weight w = pi / mu = [e^0.5, e^-0.5] (mb["logprobs"] are
    # the behaviour logprobs) = [0.5 e^0.5, -3 e^-0.5] -> mean 0.5 * (0.82436 - 1.81959) = -0.49762
    # value: 0.5 * mean([(1-3)^2, 0]) = 1.0
    pg = 0.5 * (0.5 * math.exp(0.5) - 3.0 * math.exp(-0.5))
    assert stats["policy_loss"].item() == pytest.approx(pg, rel=1e-5)
    assert stats["value_loss"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(pg + 0.5 * 1.0, rel=1e-5)
    loss.backward()  # the weight is detached: d/dlogp = -w * A / 2 = [-e^0.5 / 2, e^-0.5]
    torch.testing.assert_close(new_logprobs.grad, torch.tensor([[-0.5 * math.exp(0.5), math.exp(-0.5)]]))
    ppo_pg, _ = clipped_policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, 0.2, "token_mean", 2)
    assert ppo_pg.item() != pytest.approx(pg)  # PPO would differ on the same numbers (it clips e^0.5 to 1.2)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_capability_flags_are_what_the_config_and_fsdp_enforce(name):
    """The config refuses one sample per prompt exactly for the algorithms that need groups; FSDP refuses
    exactly the ones that are not fsdp_ok."""
    from pefrl.config import ConfigError
    from pefrl.config_loader import load_config
    from pefrl.fsdp import check_fsdp

    algo = get_algorithm(name)
    overrides = [f"algo={name}", "rollout.num_samples=1", "rollout.batch_size=8", "rl.minibatch_size=8"]
    if algo.needs_groups:
        with pytest.raises(ConfigError, match="num_samples"):
            load_config(None, overrides)
        overrides[1] = "rollout.num_samples=2"
    cfg = load_config(None, overrides)
    if algo.fsdp_ok:
        check_fsdp(cfg, algo.fsdp_ok)
    else:
        with pytest.raises(ValueError, match="FSDP"):
            check_fsdp(cfg, algo.fsdp_ok)
