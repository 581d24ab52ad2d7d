"""PPO on LoRA adapters, the whole loop in one readable file: copy it, change a stage, run it.

    accelerate launch recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml [dotted.key=value ...]
    python recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml train.steps=20

This is the loop of `pefrl train` (pefrl/trainer.py) spelled out stage by stage with pefrl's building blocks,
so it writes the same metrics.jsonl as `pefrl train` on the same config (tests/test_recipes.py checks it).
The algorithm is the config's `algo` (ppo unless --config or an override says otherwise): the stages below do
not change with it, only `algo.targets` / `algo.loss` / `algo.update` do (pefrl/algorithms/).

Safe to change: the reward (add Python callables to `EXTRA_REWARDS`), the prompts (pass `prompt_source=` to
`setup`: any iterable of {"prompt": ...} rows), what is logged (the `record` dict), when to evaluate and save.
Change with care: the order of stages 2-6 (the old logprobs must come from the policy that sampled), and the
seeding (each rank samples with its own seed; every rank must take identical optimizer steps).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _launch when run as a script

from _launch import parse_config  # noqa: E402

from pefrl.checkpoint import restore_rng, save_checkpoint  # noqa: E402
from pefrl.distributed import RankGuard  # noqa: E402
from pefrl.evaluation import play  # noqa: E402
from pefrl.metrics import Timer, progress_line  # noqa: E402
from pefrl.sampling_loop import Drawn, sample_batch  # noqa: E402
from pefrl.scoring import score_rollout  # noqa: E402
from pefrl.trainer import after_training, before_training, evaluation, setup, step_record, step_timing  # noqa: E402
from pefrl.update import update  # noqa: E402

# Your own reward functions, (name, fn(prompts, completions, **columns) -> list[float]); added to the config's.
EXTRA_REWARDS: list = []


def main(algo: str = "ppo") -> dict:
    cfg = parse_config(algo)
    # Load the base once, add the adapters, build reward, prompts, optimizer (run.updater), KL controller;
    # resume from a checkpoint when train.resume says so.
    run = setup(cfg, extra_rewards=EXTRA_REWARDS)
    accelerator, algo, models, tokenizer, scorer = run.accelerator, run.algo, run.models, run.tokenizer, run.scorer
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # distinct samples per rank
    writer, summary = before_training(run)  # run files, config.yaml, trackers, evaluation before training
    if run.resumed_from is not None:
        restore_rng(run.resumed_from, rank)  # after the evaluation above, which draws from the RNG too
    t_start, bad_steps, steps_done = time.perf_counter(), 0, run.start_step

    def draw(timer: Timer) -> Drawn | None:
        """Stages 1-3 for one batch of prompts; None once the prompt source has ended."""
        # 1. prompts: every rank draws the same global batch and keeps its slice; each prompt k times
        global_rows = run.stream.next_batch(cfg.rollout.batch_size * world)
        if global_rows is None:
            return None
        my_rows = global_rows[rank * cfg.rollout.batch_size : (rank + 1) * cfg.rollout.batch_size]
        my_rows = [row for row in my_rows for _ in range(cfg.rollout.num_samples)]

        # 2. generate with the policy adapter; the sampler also scores what it can on the way (the
        #    reference's logprobs, the shared critic's values) so stage 4 has less to do
        with timer("generate"):
            texts, rollout, columns = play(models, tokenizer, my_rows, cfg, cfg.rollout, scores_too=True)

        # 3. score: one float per completion; reward functions see the prompt text and every other column
        with timer("score"):
            scores, reward_stats = scorer(texts, rollout.completions, columns)  # (B,)
        return Drawn(texts, rollout, columns, scores, reward_stats)

    for step in range(run.start_step, cfg.train.steps):
        timer = Timer()
        t0, cpu0 = time.perf_counter(), time.process_time()

        with RankGuard(accelerator, step):  # an error in stages 1-3 on any rank stops every rank, naming it
            # 1-3. prompts, generate, score (`draw`); dynamic sampling draws again while a prompt's rewards are all
            #      equal, overlong shaping adds the length penalty (pefrl/sampling_loop.py)
            sampled = sample_batch(lambda: draw(timer), cfg, algo, tokenizer)
        if sampled is None:
            accelerator.print(f"prompt source ended after {step} steps")
            break
        rollout, scores, reward_stats = sampled.rollout, sampled.scores, sampled.reward_stats

        # 4. without grad: old logprobs, reference logprobs (adapters off) and values, where the sampler
        #    did not already record them
        with timer("reference"):
            batch = score_rollout(models, rollout, sampled.shaped_scores.to(accelerator.device), cfg, algo,
                                  finished=sampled.finished)

        # 5. targets: PPO shapes the rewards with a per-token KL penalty to the reference and runs GAE on the
        #    critic's values (Ziegler et al. 2019); algo_state is checkpointed (e.g. REINFORCE's baseline)
        kl_coef = run.kl_ctl.value
        targets = algo.targets(batch, cfg.rl, kl_coef, run.algo_state)

        # 6. update: rl.epochs x minibatches of the clipped loss, micro-batched; the updater averages
        #    gradients over ranks, clips them, and skips (and undoes) any non-finite step
        with timer("train"):
            train_stats = update(models, run.updater, batch, targets, cfg, kl_coef, rollout, algo)
        bad_steps = bad_steps + 1 if train_stats.get("skipped_updates", 0) else 0
        if bad_steps >= cfg.train.max_bad_steps:
            raise FloatingPointError(f"{bad_steps} steps in a row had a non-finite loss or gradient, or a step "
                                     "that made the adapters non-finite (each one skipped and undone); stopping")

        # 7. log, adapt the KL coefficient, evaluate, checkpoint
        record = step_record(run, step, batch, scores, kl_coef, reward_stats,  # reward stats over every rank
                             {**sampled.stats, **targets.stats, **train_stats, **getattr(rollout, "stats", {})})
        run.kl_ctl.update(record["kl"], cfg.rollout.num_sequences * world)  # adaptive: Ziegler et al. 2019
        if run.eval_rows and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            # greedy eval_reward_mean, eval_reward/<function>, eval_pass@k (eval.num_samples); keep=True: the
            # adapters go to best/ when train.keep_best's metric is the best so far
            record.update(evaluation(run, step + 1, keep=True))
        record.update(step_timing(timer, t0, cpu0, batch.response_mask, accelerator))
        writer.write(record)
        if cfg.train.trackers:
            accelerator.log(record, step=step)
        if accelerator.is_main_process and (step + 1) % cfg.train.log_every == 0:
            print(progress_line(record, cfg.train.steps), flush=True)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            save_checkpoint(run.train_state(), accelerator, cfg.output_dir, step + 1, cfg.train.keep_last)
        steps_done = step + 1

    summary["steps"] = steps_done
    summary["train_seconds"] = time.perf_counter() - t_start
    return after_training(run, summary)  # evaluation after training, final/ adapters, summary.json


if __name__ == "__main__":
    summary = main()
    print({k: v for k, v in summary.items() if k.startswith("eval") or k in ("steps", "train_seconds")})
