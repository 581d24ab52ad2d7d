"""Evaluation users can trust: pass@k / mean@k over k samples, per-function metrics, best/ adapters (train.keep_best)
that survive a resume and keep_last, `pefrl eval --num-samples`, and sampled evaluation that never moves training.

All on the embedded tiny arithmetic model, CPU, one thread.
"""

import collections
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pefrl.cli import main
from pefrl.evaluation import evaluate_run
from pefrl.config import ConfigError
from pefrl.config_loader import load_config
from pefrl.data import load_rows
from pefrl.evaluation import evaluate
from pefrl.models import load_models, load_tokenizer
from pefrl.ops.eval_stats import pass_at_k
from pefrl.rewards import build_scorer
from pefrl.rundir import run_files
from pefrl.tasks.arithmetic import exact_match
from pefrl.trainer import train

K = 4
TINY = ["rollout.batch_size=4", "rollout.max_new_tokens=4", "rl.minibatch_size=4", "lora.r=2", "train.lr=3e-3",
        "data.eval_size=6"]
TIMING = ("step_time_s", "step_cpu_s", "gen_time_s", "score_time_s", "reference_time_s", "train_time_s",
          "gen_tokens_per_s")


def _correct(prompt: str) -> int:
    return len(prompt) % (K + 1)  # 0..K, spread over the arithmetic prompts


def known_fraction(prompts, completions, **_):
    """1 on the first _correct(prompt) samples of each prompt in a call, else 0: whatever was sampled, prompt p has
    exactly _correct(p) correct samples out of K."""
    seen = collections.Counter()
    scores = []
    for p in prompts:
        scores.append(1.0 if seen[p] < _correct(p) else 0.0)
        seen[p] += 1
    return scores


CALLS: list[tuple[list[str], list[float]]] = []


def recorded_exact(prompts, completions, **columns):
    """exact_match, each call's (prompts, scores) kept in CALLS."""
    scores = exact_match(prompts, completions, **columns)
    CALLS.append((list(prompts), list(scores)))
    return scores


def half(prompts, completions, **_):
    return [0.5] * len(completions)


def _setup(*overrides):
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY, *overrides])
    models = load_models(cfg.model, cfg.lora, uses_critic=False)
    rows = load_rows("builtin:arithmetic-eval")[:6]
    return cfg, models, load_tokenizer(cfg.model), rows


def test_pass_at_k_counts_the_samples_above_the_threshold():
    cfg, models, tok, rows = _setup("reward.functions=[tests.test_evaluation:known_fraction]", f"eval.num_samples={K}")
    metrics = evaluate(models, tok, rows, cfg, build_scorer(cfg.reward))
    correct = torch.tensor([_correct(r["prompt"]) for r in rows])
    assert 0 < correct.sum() < K * len(rows)
    for j in (1, K):
        assert metrics[f"pass@{j}"] == pytest.approx(pass_at_k(K, correct, j).mean().item())
    assert metrics["pass@1"] == pytest.approx(correct.sum().item() / (K * len(rows)))  # pass@1 = fraction correct
    assert metrics[f"mean@{K}"] == pytest.approx(metrics["pass@1"])  # 0/1 scores
    assert metrics["reward_mean"] == pytest.approx((correct > 0).float().mean().item())  # greedy: one sample each
    # a higher threshold: no sample is correct
    cfg.eval.correct_threshold = 1.5
    assert evaluate(models, tok, rows, cfg, build_scorer(cfg.reward))[f"pass@{K}"] == 0.0


def test_sampled_metrics_match_the_estimator_on_the_sampled_rewards_and_leave_the_rng_alone():
    cfg, models, tok, rows = _setup(f"eval.num_samples={K}", "rollout.temperature=1.5")  # hot: right and wrong
    scorer = build_scorer(cfg.reward, [("recorded_exact", recorded_exact)])  # this module's CALLS
    torch.manual_seed(7)
    CALLS.clear()
    metrics = evaluate(models, tok, rows, cfg, scorer, step=3)
    after_sampled = torch.get_rng_state()
    (greedy_prompts, greedy), (prompts, sampled) = CALLS
    assert greedy_prompts == [r["prompt"] for r in rows] and metrics["reward_mean"] == pytest.approx(sum(greedy) / 6)
    assert prompts == [r["prompt"] for r in rows for _ in range(K)]  # rows K*i..K*i+K-1: prompt i's samples
    scores = torch.tensor(sampled).view(len(rows), K)  # (P, K)
    assert 0 < scores.sum() < scores.numel(), "the test needs some right and some wrong samples"
    correct = (scores >= 1.0).sum(-1)
    assert metrics[f"pass@{K}"] == pytest.approx(pass_at_k(K, correct, K).mean().item())
    assert metrics["pass@1"] == pytest.approx(pass_at_k(K, correct, 1).mean().item())
    assert metrics[f"mean@{K}"] == pytest.approx(scores.mean().item())
    # same step: same samples; the caller's RNG ends where a greedy-only evaluation leaves it
    assert evaluate(models, tok, rows, cfg, scorer, step=3) == metrics
    cfg.eval.num_samples = 0
    torch.manual_seed(7)
    assert evaluate(models, tok, rows, cfg, scorer, step=3)["reward_mean"] == metrics["reward_mean"]
    assert torch.equal(torch.get_rng_state(), after_sampled)


def test_eval_metrics_per_reward_function_in_the_run_and_in_pefrl_eval(tmp_path, capsys):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "train.steps=1", "train.eval_every=1",
                             "reward.functions=[pefrl.tasks.arithmetic:exact_match,tests.test_evaluation:half]",
                             "reward.weights=[1.0,2.0]"])
    summary = train(cfg)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval_reward/half"] == 0.5
    assert record["eval_reward_mean"] == pytest.approx(record["eval_reward/exact_match"] + 2 * 0.5)
    assert summary["eval_after_metrics"]["eval_reward/exact_match"] == record["eval_reward/exact_match"]
    assert summary["eval_after"] == record["eval_reward_mean"]  # the same adapters after the last step

    assert main(["eval", str(tmp_path), "--size", "6", "--num-samples", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["reward/exact_match"] == record["eval_reward/exact_match"]
    assert printed["reward_mean"] == pytest.approx(record["eval_reward_mean"])
    assert {"pass@1", "pass@3", "mean@3"} <= set(printed) and printed["mean@3"] >= 1.0  # half's 2 * 0.5 each
    assert evaluate_run(tmp_path, size=6, num_samples=3) == printed  # the same seed: the same samples
    assert "pass@1" not in evaluate_run(tmp_path, size=6)  # the run's eval.num_samples: 0


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(directory)}:{k}": v for f in sorted(directory.rglob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


BEST = [*TINY, "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "train.eval_every=1",
        "train.keep_best=eval_reward_mean", "rollout.temperature=2.0"]  # hot: evaluations go up and down


def test_keep_best_keeps_the_best_evaluated_adapters_and_keep_last_spares_them(tmp_path):
    out = tmp_path / "all"
    summary = train(load_config(None, [*BEST, f"output_dir={out}", "train.steps=4", "train.save_every=1",
                                       "train.keep_last=10"]))
    values = [r["eval_reward_mean"] for r in _records(out)]
    step = values.index(max(values)) + 1  # the first of equal values: later ones are not better
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"metric": "eval_reward_mean", "value": max(values), "step": step} == summary["best"]
    checkpoint = _tensors(out / f"checkpoint-{step}" / "adapters")
    assert checkpoint.keys() == _tensors(out / "best").keys()
    assert all(torch.equal(v, checkpoint[k]) for k, v in _tensors(out / "best").items())
    assert evaluate_run(out, adapter="best", size=6)["reward_mean"] == pytest.approx(max(values))

    kept = tmp_path / "kept"  # keep_last=1: every older checkpoint goes, best/ stays
    train(load_config(None, [*BEST, f"output_dir={kept}", "train.steps=4", "train.save_every=1", "train.keep_last=1"]))
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == ["best", "checkpoint-4", "final"]
    assert json.loads((kept / "best" / "best.json").read_text()) == best  # the same run
    assert "best" in run_files(kept)  # train.overwrite deletes it with the run


def test_the_best_so_far_survives_a_resume(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, [*BEST, f"output_dir={out}", "train.steps=2", "train.save_every=2"]))
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["best"] == json.loads((out / "best" / "best.json").read_text())
    # the resumed run must compare against the checkpoint's best: make it unbeatable (rewards are <= 1)
    state["best"] = {"metric": "eval_reward_mean", "value": 1.5, "step": 2}
    state_file.write_text(json.dumps(state))
    before = _tensors(out / "best")
    summary = train(load_config(None, [*BEST, f"output_dir={out}", "train.steps=4", "train.resume=latest"]))
    assert summary["best"] == {"metric": "eval_reward_mean", "value": 1.5, "step": 2}
    assert all(torch.equal(v, before[k]) for k, v in _tensors(out / "best").items())  # never replaced


def test_sampled_evaluation_does_not_change_training(tmp_path):
    base = [*TINY, "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "train.steps=3", "train.eval_every=1"]
    train(load_config(None, [*base, f"output_dir={tmp_path / 'greedy'}"]))
    train(load_config(None, [*base, f"output_dir={tmp_path / 'sampled'}", f"eval.num_samples={K}"]))
    greedy, sampled = _records(tmp_path / "greedy"), _records(tmp_path / "sampled")
    for a, b in zip(greedy, sampled, strict=True):
        assert {k: v for k, v in b.items() if k not in a} and all(k.startswith("eval_") for k in b if k not in a)
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: b[k] for k in a if k not in TIMING}
    final_a, final_b = _tensors(tmp_path / "greedy" / "final"), _tensors(tmp_path / "sampled" / "final")
    assert all(torch.equal(v, final_b[k]) for k, v in final_a.items())


def test_keep_best_and_eval_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="train.keep_best=eval_reward_mean needs train.eval_every"):
        load_config(None, ["train.keep_best=eval_reward_mean"])
    with pytest.raises(ConfigError, match=r"eval_pass@8 is not logged with eval.num_samples=4"):
        load_config(None, ["train.keep_best=eval_pass@8", "train.eval_every=1", "eval.num_samples=4"])
    with pytest.raises(ConfigError, match="must name an evaluation metric"):
        load_config(None, ["train.keep_best=reward_mean", "train.eval_every=1"])
    with pytest.raises(ConfigError, match="eval.num_samples must be >= 0"):
        load_config(None, ["eval.num_samples=-1"])
    assert load_config(None, ["train.keep_best=eval_pass@4", "train.eval_every=1", "eval.num_samples=4"])


@pytest.mark.slow  # launches two processes (~30 s on 2 cores)
def test_two_ranks_evaluate_their_shards_and_reduce_to_the_one_rank_numbers(tmp_path):
    """7 held-out prompts over 2 ranks (4 + 3): every metric is over all 7, as on one rank (the evaluation before
    training: identical adapters; known_fraction makes pass@k independent of what was sampled)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    args = ["train", "recipes/configs/arithmetic_ppo.yaml", *TINY, "data.eval_size=7", "train.steps=1",
            f"eval.num_samples={K}", "reward.functions=[tests.test_evaluation:known_fraction]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    summaries = []
    for ranks, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(repo / "recipes" / "accelerate" / "ddp_cpu_2ranks.yaml"), "-m", "pefrl.cli"] if ranks == 2
                  else [sys.executable, "-m", "pefrl.cli"])
        res = subprocess.run([*launch, *args, f"output_dir={out}"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        summaries.append(json.loads((out / "summary.json").read_text())["eval_before_metrics"])
    one, two = summaries
    assert one.keys() == two.keys() and {f"eval_pass@{K}", f"eval_mean@{K}", "eval_reward/known_fraction"} <= set(one)
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
