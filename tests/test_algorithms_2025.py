"""dapo, gspo, cispo as registered algorithms; rl.clip_range_high for ppo/grpo; the token-share update; dynamic
sampling and overlong handling (pefrl/sampling_loop.py). The pure losses are tested in test_losses_2025.py."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from pefrl.algorithms import get_algorithm
from pefrl.algorithms.base import clip_bounds
from pefrl.config import ConfigError, RLConfig
from pefrl.config_loader import load_config
from pefrl.ops.losses import aggregate
from pefrl.rollout import Rollout
from pefrl.sampling_loop import Drawn, _refill, finished_rows
from pefrl.updater import Updater


def one_token_mb(log_ratio: float, advantage: float = 1.0, rows: int = 1):
    """rows x 1 token with pi/pi_old = exp(log_ratio), the reference equal to the old policy."""
    old = torch.full((rows, 1), -1.0)
    new = (old + log_ratio).requires_grad_()
    mb = {"response_mask": torch.ones(rows, 1), "logprobs": old, "ref_logprobs": old,
          "advantages": torch.full((rows, 1), advantage)}
    return mb, new


def run_loss(name: str, cfg: RLConfig, log_ratio: float, advantage: float = 1.0):
    mb, new = one_token_mb(log_ratio, advantage)
    loss, stats = get_algorithm(name).loss(mb, new, None, torch.zeros_like(new), cfg, 0.0, 1)
    loss.backward()
    return loss.item(), new.grad.item(), stats


def test_clip_bounds_resolve_the_published_defaults():
    assert clip_bounds(RLConfig(), 0.2) == (0.2, 0.2)  # ppo / grpo: symmetric
    assert clip_bounds(RLConfig(), 0.2, 0.28) == (0.2, 0.28)  # dapo
    assert clip_bounds(RLConfig(clip_range=0.1), 0.2, 0.28) == (0.1, 0.28)
    assert clip_bounds(RLConfig(clip_range_high=0.5), 0.2) == (0.2, 0.5)
    assert clip_bounds(RLConfig(), None, 0.28) == (None, 0.28)  # cispo: no lower bound
    with pytest.raises(ConfigError, match="clip_range_high"):
        RLConfig(clip_range_high=-0.1)


def test_clip_higher_in_dapo_and_opt_in_for_ppo_and_grpo():
    # ratio e^0.24 = 1.27 with A = 1: past 1 + 0.2, inside 1 + 0.28
    _, grad, stats = run_loss("grpo", RLConfig(), 0.24)
    assert grad == 0.0 and stats["clipfrac_high"].item() == 1.0  # symmetric 0.2: clipped, no gradient
    loss, grad, stats = run_loss("dapo", RLConfig(), 0.24)
    assert loss == pytest.approx(-math.exp(0.24)) and grad == pytest.approx(-math.exp(0.24))  # d(-r)/dlogp = -r
    assert stats["clipfrac_high"].item() == 0.0
    _, grad, _ = run_loss("dapo", RLConfig(clip_range_high=0.2), 0.24)  # the user's value wins
    assert grad == 0.0
    for name in ("grpo", "rloo"):
        assert run_loss(name, RLConfig(clip_range_high=0.28), 0.24)[1] == pytest.approx(-math.exp(0.24))
    mb, new = one_token_mb(0.24)
    mb.update(values=torch.zeros(1, 1), returns=torch.zeros(1, 1))
    loss, stats = get_algorithm("ppo").loss(mb, new, torch.zeros(1, 1), torch.zeros(1, 1),
                                            RLConfig(clip_range_high=0.28), 0.0, 1)
    assert stats["clipfrac_high"].item() == 0.0


def test_gspo_clips_the_sequence_ratio_at_the_published_range():
    # one token: s = r = e^0.001 = 1.001 > 1 + 4e-4, A > 0: clipped, so no gradient; 3e-4 inside
    _, grad, stats = run_loss("gspo", RLConfig(), 0.001)
    assert grad == 0.0 and stats["clipfrac_high"].item() == 1.0
    _, grad, _ = run_loss("gspo", RLConfig(), 3e-4)
    assert grad == pytest.approx(-math.exp(3e-4))
    _, grad, _ = run_loss("gspo", RLConfig(clip_range_high=0.01), 0.001)  # configurable
    assert grad == pytest.approx(-math.exp(0.001))


def test_cispo_keeps_the_gradient_that_ppo_clipping_drops():
    # r = e^0.5 = 1.65, A = 1: the clipped surrogate has zero gradient; CISPO weighs the token by 1.28
    assert run_loss("dapo", RLConfig(), 0.5)[1] == 0.0
    loss, grad, stats = run_loss("cispo", RLConfig(), 0.5)
    assert grad == pytest.approx(-1.28) and loss == pytest.approx(-1.28 * -0.5)  # -w A logp, logp = -0.5
    assert stats["clipfrac"].item() == 1.0
    # no lower bound by default: r = e^-2 = 0.135 weighs 0.135; clip_range 0.2 floors it at 0.8
    assert run_loss("cispo", RLConfig(), -2.0)[1] == pytest.approx(-math.exp(-2.0))
    assert run_loss("cispo", RLConfig(clip_range=0.2), -2.0)[1] == pytest.approx(-0.8)


def test_token_mean_micro_batches_add_up_to_the_minibatch_token_mean():
    """Rows of 1, 3, 2 and 2 tokens, one minibatch of 4 in micro-batches of 2: the micro-batches' token means
    weighted by their token shares are the mean over all 8 tokens; weighted by rows they are not."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.float32)
    per_token = torch.tensor([[8.0, 0, 0], [1, 1, 1], [2, 2, 0], [4, 4, 0]])
    whole = aggregate(per_token, mask, "token_mean", 3).item()  # (8 + 3 + 4 + 8) / 8 = 2.875
    assert whole == pytest.approx(23 / 8)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.0)
    updater = Updater([param], optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))

    def total(row_weights):
        parts = []

        def backward(idx, scale):
            parts.append(aggregate(per_token[idx], mask[idx], "token_mean", 3).item() * scale)
            return {}

        updater.minibatches(4, 1, 4, 2, backward, row_weights=row_weights)
        return sum(parts)

    torch.manual_seed(0)
    assert total(mask.sum(-1)) == pytest.approx(whole)
    by_rows = [total(None) for _ in range(5)]  # depends on which rows share a micro-batch
    assert any(abs(t - whole) > 0.1 for t in by_rows)


# --- dynamic sampling and overlong --------------------------------------------------------------------------


def fake_drawn(scores, P, T, tag):
    """A Drawn of len(scores) rows, prompt length P and response length T (every token real)."""
    B = len(scores)
    rollout = Rollout(query_ids=torch.full((B, P), 7), query_mask=torch.ones(B, P),
                      response_ids=torch.arange(B).unsqueeze(-1).repeat(1, T) + 10, response_mask=torch.ones(B, T),
                      completions=[f"{tag}{i}" for i in range(B)], logprobs=torch.full((B, T), -1.0))
    return Drawn(texts=[f"{tag}{i}" for i in range(B)], rollout=rollout, columns={"answer": list(range(B))},
                 scores=torch.tensor(scores), reward_stats={"reward/exact": sum(scores) / B, "reward_failures": 1.0})


def test_refill_keeps_informative_groups_and_pads_to_the_batch_shape():
    # k = 2, batch of 2 prompts. Draw a: prompts (1, 1) and (0, 1): the second kept. Draw b (longer prompt and
    # response): (1, 0), kept: the batch is full after 2 draws, 1 of 3 prompts had zero spread.
    draws = iter([fake_drawn([1.0, 0.0], 3, 2, "b"), None])
    drawn, stats = _refill(fake_drawn([1.0, 1.0, 0.0, 1.0], 2, 1, "a"), lambda: next(draws), 2, 2, 10, 0)
    assert drawn.rollout.completions == ["a2", "a3", "b0", "b1"] and drawn.texts == ["a2", "a3", "b0", "b1"]
    assert drawn.scores.tolist() == [0.0, 1.0, 1.0, 0.0] and drawn.columns["answer"] == [2, 3, 0, 1]
    assert stats == {"frac_reward_zero_std": 1 / 3, "dynamic_sampling_draws": 2.0, "dynamic_sampling_filled": 0.0}
    r = drawn.rollout
    assert r.query_ids.shape == (4, 3) and r.query_mask.tolist()[0] == [0, 1, 1]  # left-padded to P = 3
    assert r.response_mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]  # right-padded to T = 2
    assert r.logprobs[0].tolist() == [-1.0, 0.0] and r.ref_logprobs is None
    assert drawn.reward_stats == {"reward/exact": pytest.approx(4 / 6), "reward_failures": 2.0}  # rows: 3 + 1 of 6


def test_refill_at_the_draw_cap_fills_with_the_last_dropped_groups():
    draws = iter([fake_drawn([1.0, 1.0, 0.0, 0.0], 2, 1, "b")])
    drawn, stats = _refill(fake_drawn([0.0, 1.0, 1.0, 1.0], 2, 1, "a"), lambda: next(draws), 2, 2, 2, 0)
    assert stats["dynamic_sampling_draws"] == 2.0 and stats["dynamic_sampling_filled"] == 1.0
    assert stats["frac_reward_zero_std"] == 0.75
    assert drawn.rollout.completions == ["a0", "a1", "b2", "b3"]  # the informative one, then the last dropped


def test_finished_rows_tell_truncated_from_stopped():
    # max_new_tokens 3: row 0 stopped early; row 1 ends on EOS (2, special); row 2 holds the stop string; row 3 cut
    tokenizer = SimpleNamespace(all_special_ids=[0, 2], decode=lambda ids: "".join("x;"[i == 5] for i in ids))
    ids = torch.tensor([[4, 2, 0], [4, 4, 2], [4, 5, 4], [4, 4, 4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    rollout = Rollout(query_ids=torch.ones(4, 1), query_mask=torch.ones(4, 1), response_ids=ids, response_mask=mask,
                      completions=[""] * 4)
    assert finished_rows(rollout, 3, [";"], tokenizer).tolist() == [True, True, True, False]
    assert finished_rows(rollout, 3, [], tokenizer).tolist() == [True, True, False, False]


def test_dynamic_sampling_config_checks():
    with pytest.raises(ConfigError, match="num_samples >= 2"):
        load_config(None, ["rl.dynamic_sampling=true", "reward.functions=[pefrl.tasks.arithmetic:exact_match]"])
    with pytest.raises(ConfigError, match="overlong_buffer_len"):
        load_config(None, ["rl.overlong_buffer_len=40", "rollout.max_new_tokens=16"])


def test_dapo_run_logs_dynamic_sampling_and_masks_truncated_rows(tmp_path):
    """Two steps of the dapo recipe at max_new_tokens 3 (answers need up to 4 tokens with EOS): some rows are cut
    off, the filter leaves them out of the loss, the soft penalty lowers the shaped scores, and the metrics say so."""
    from pefrl.trainer import train

    cfg = load_config("recipes/configs/arithmetic_dapo.yaml", [
        f"output_dir={tmp_path}", "train.steps=2", "data.eval_prompts=", "rollout.batch_size=4",
        "rl.minibatch_size=8", "rl.grad_accum_steps=2", "rollout.max_new_tokens=3", "rl.overlong_buffer_len=1"])
    assert train(cfg)["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert 1 <= r["dynamic_sampling_draws"] <= 4 and 0 <= r["frac_reward_zero_std"] <= 1
        assert r["length_max"] <= 3 and r["truncated_frac"] > 0
        # every row of length 3 = L_max scores -1 more, the truncated ones among them
        assert r["overlong_penalty_mean"] <= -r["truncated_frac"] < 0
        assert {"clipfrac_low", "clipfrac_high"} <= set(r)
