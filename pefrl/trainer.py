"""The online RL loop: one flat function in numbered stages, the only place that touches the Accelerator.

    1. prompts     this rank's slice of the global batch, each repeated rollout.num_samples times
    2. generate    evaluation.play: policy adapter, left-padded batches, KV cache (or environment episodes)
    3. score       the run's Scorer: reward functions and/or reward model -> scores (B,)
                   (1-3 are `draw`; sampling_loop.sample_batch calls it again for dynamic sampling, and shapes
                   overlong completions)
    4. no-grad     scoring.score_rollout: old / reference logprobs and values the sampler did not record
    5. targets     algo.targets: KL-shaped rewards and advantages (pefrl/algorithms/)
    6. update      update.update: epochs x minibatches through the Updater (only adapters and value head)
    7. log         metrics.jsonl, progress line, trackers; evaluation and checkpoints

One call per stage; each stage's module owns its decisions (which passes are left, the critic's shape, the
optimizer step), so the loop never branches on the algorithm or the critic.

Batch semantics: `rollout.batch_size` and `rl.minibatch_size` count sequences per process. With N processes
one step consumes N * batch_size prompts (each rank a distinct slice); gradients of the trainable parameters
are averaged over ranks before every optimizer step, so N ranks with batch b match one rank with batch N * b
and minibatch N * m up to float summation order, where the loss is per-sequence (sequence_mean) and no
statistic is taken over the batch (whitening and token_mean are per rank); see docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pefrl.adapters_io import save_adapters
from pefrl.algorithms import Algorithm, RolloutBatch, check_config, get_algorithm
from pefrl.arch import context_length
from pefrl.checkpoint import TrainState, best_metric, keep_best, load_checkpoint, restore_rng, save_checkpoint
from pefrl.config import Config
from pefrl.data import PromptStream, check_prompts, load_rows
from pefrl.distributed import RankGuard, check_supported
from pefrl.envs import env_rewards, seed_rows
from pefrl.evaluation import eval_rows, evaluate, play, prompts_seen, split_rows
from pefrl.fsdp import check_fsdp, fsdp_requested, shard_models, trim_eval_rows
from pefrl.fsdp_load import claim_sharded_loading
from pefrl.heap import auto_mmap_threshold, set_mmap_threshold
from pefrl.metrics import MetricsWriter, Timer, progress_line
from pefrl.models import Models, load_models, load_tokenizer, resolve_model_path
from pefrl.ops.advantages import masked_mean
from pefrl.ops.kl import kl_estimate, make_kl_controller
from pefrl.rewards import Scorer, build_scorer, reduce_stats
from pefrl.rollout import use_pefrl_engine
from pefrl.rundir import resolve_run, start_run
from pefrl.sampling_loop import Drawn, check_dynamic_sampling, sample_batch
from pefrl.scoring import score_rollout
from pefrl.startline import start_line
from pefrl.update import update
from pefrl.updater import Updater


@dataclass
class Run:
    """What a run holds, built once by `setup` and advanced by `train`: plain components, no behaviour."""

    cfg: Config
    accelerator: Accelerator
    algo: Algorithm
    tokenizer: Any
    models: Models
    scorer: Scorer
    stream: PromptStream
    eval_rows: list[dict[str, Any]]
    updater: Updater  # the trained parameters, optimizer and scheduler: stage 6's narrow service
    kl_ctl: Any
    algo_state: dict[str, float] = field(default_factory=dict)
    start_step: int = 0
    resumed_from: Path | None = None
    best: dict[str, Any] = field(default_factory=dict)  # train.keep_best's best evaluation so far (checkpointed)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.updater.params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.updater.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.updater.scheduler

    def train_state(self) -> TrainState:
        """What a checkpoint saves and restores (the same objects, so loading one restores this run)."""
        return TrainState(models=self.models, optimizer=self.optimizer, scheduler=self.scheduler,
                          kl_ctl=self.kl_ctl, algo_state=self.algo_state, stream=self.stream, best=self.best)


def setup(
    cfg: Config,
    extra_rewards: Sequence[tuple[str, Callable]] = (),
    prompt_source: Iterable[dict[str, Any]] | None = None,
) -> Run:
    """Load the base once, add adapters, build reward, data, optimizer and KL controller. The run's config is
    `run.cfg`: with prompts from Python, data.eval_prompts 'auto' means no evaluation set (never the builtin's)."""
    if prompt_source is not None and cfg.data.eval_prompts == "auto":  # the user's prompts, not data.prompts
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_prompts=None))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.train.trackers or None,
                              project_dir=cfg.output_dir)
    check_supported(accelerator)  # DeepSpeed / Megatron would shard nothing here: stop, don't run unsharded
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu and cfg.train.mmap_threshold_mib:
        set_mmap_threshold(cfg.train.mmap_threshold_mib)  # before loading: the load's blocks too
    resumed_from = resolve_run(cfg)  # None: fresh; refuses a used output_dir or a changed config before loading
    algo = get_algorithm(check_config(cfg).algo)  # a Config built in Python, not loaded, is checked here
    check_dynamic_sampling(cfg, algo, accelerator.num_processes)  # one process, single-turn prompts
    sharded = fsdp_requested(accelerator)
    if sharded:
        check_fsdp(cfg, fsdp_ok=algo.fsdp_ok)
    torch.manual_seed(cfg.train.seed)  # identical adapter and value-head init on every rank
    tokenizer = load_tokenizer(cfg.model)
    # sharded loading (fsdp_cpu_ram_efficient_loading): no rank holds the whole base, each reads its shard
    from_shards = sharded and claim_sharded_loading()
    models = load_models(cfg.model, cfg.lora, uses_critic=algo.uses_critic, weights=not from_shards)
    if on_cpu and cfg.train.mmap_threshold_mib is None and auto_mmap_threshold(
            cfg.model.quantization is not None, models.lm.num_parameters(), sharded):
        set_mmap_threshold(1)  # a large quantized or sharded base: freed blocks go back to the system (before
        # shard_models: a sharded load's blocks too)
    if sharded:  # FSDP2: the base sharded over ranks, adapters and value head replicated (pefrl/fsdp.py)
        shard_models(models, accelerator.device, checkpoint=resolve_model_path(cfg.model) if from_shards else None)
        # at setup, not at the first rollout: the lean decoder reads layer weights directly, never where FSDP
        # gathers them, so engine 'pefrl' raises here naming the sharded base ('auto' falls back to generate)
        use_pefrl_engine(models, cfg.rollout)
    models.model.to(accelerator.device)
    if models.value_head is not None:
        models.value_head.to(accelerator.device)
    accelerator.print(start_line(cfg, models, accelerator.num_processes, accelerator.device))
    scorer = build_scorer(cfg.reward, [*env_rewards(cfg.env), *extra_rewards])
    if cfg.env.name:  # rows are environment seeds; the environment writes the prompts (pefrl/envs.py)
        rows, held_out = seed_rows(cfg.train.seed), eval_rows(cfg)
    else:
        source = cfg.data.prompts if prompt_source is None else "prompt_source"
        rows = prompt_source if prompt_source is not None else load_rows(cfg.data.prompts, cfg.data, "data.prompts")
        rows, held_out = split_rows(cfg, rows, source)  # data.eval_holdout: held-out rows never trained on
        positions = context_length(models.model.config)  # prompts that do not fit are an error, named by row index
        rows = check_prompts(rows, tokenizer, cfg.data, cfg.rollout.max_new_tokens, positions, source)
        held_out = check_prompts(held_out, tokenizer, cfg.data, cfg.rollout.max_new_tokens, positions,
                                 source=f"{source} (held out)" if cfg.data.eval_holdout else str(cfg.data.eval_source))
    if sharded:
        held_out = trim_eval_rows(held_out, accelerator.num_processes)  # equal generate calls on every rank
    params = models.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    updater = Updater(params, optimizer, scheduler, world=accelerator.num_processes,
                      max_grad_norm=cfg.train.max_grad_norm)
    run = Run(cfg=cfg, accelerator=accelerator, algo=algo, tokenizer=tokenizer, models=models, scorer=scorer,
              stream=PromptStream(rows, seed=cfg.train.seed, shuffle=cfg.data.shuffle), eval_rows=held_out,
              updater=updater, kl_ctl=make_kl_controller(cfg.rl.kl_coef, cfg.rl.kl_target, cfg.rl.kl_horizon))
    run.resumed_from = resumed_from
    if run.resumed_from is not None:
        run.start_step = load_checkpoint(run.train_state(), run.resumed_from)
        accelerator.print(f"resumed from {run.resumed_from} at step {run.start_step}")
    return run


def train(
    cfg: Config,
    extra_rewards: Sequence[tuple[str, Callable]] = (),
    prompt_source: Iterable[dict[str, Any]] | None = None,
    run: Run | None = None,
) -> dict[str, Any]:
    """Run cfg.train.steps RL steps; returns a summary (eval before/after, steps, seconds)."""
    run = run or setup(cfg, extra_rewards, prompt_source)
    cfg = run.cfg  # as setup resolved it
    accelerator, algo, models, tokenizer = run.accelerator, run.algo, run.models, run.tokenizer
    held_out, kl_ctl, algo_state = run.eval_rows, run.kl_ctl, run.algo_state
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # distinct samples per rank
    writer, summary = before_training(run)  # run files, config.yaml, trackers, the evaluation before training
    if run.resumed_from is not None:
        restore_rng(run.resumed_from, rank)  # here, not in setup: evaluation above draws from the RNG too
    t_start, bad_steps, steps_done = time.perf_counter(), 0, run.start_step
    bar = tqdm(total=cfg.train.steps, initial=run.start_step, desc=f"pefrl {cfg.algo}", unit="step",
               disable=not accelerator.is_main_process or not sys.stderr.isatty(),  # a log file: progress lines
               dynamic_ncols=True)

    for step in range(run.start_step, cfg.train.steps):
        timer = Timer()
        t0, cpu0 = time.perf_counter(), time.process_time()

        with RankGuard(accelerator, step):  # an error in stages 1-3 on any rank stops every rank, naming it
            # 1-3. prompts, generate, score (`draw`); dynamic sampling draws again while a prompt's rewards are all
            #      equal, overlong shaping adds the length penalty (pefrl/sampling_loop.py)
            sampled = sample_batch(lambda: draw(run, timer), cfg, algo, tokenizer)
        if sampled is None:
            accelerator.print(f"prompt source ended after {step} steps")
            break
        rollout, scores, reward_stats = sampled.rollout, sampled.scores, sampled.reward_stats

        # 4. old logprobs, reference logprobs and values: whatever the sampler did not already score
        with timer("reference"):
            batch = score_rollout(models, rollout, sampled.shaped_scores.to(accelerator.device), cfg, algo,
                                  finished=sampled.finished)

        # 5. rewards and advantages
        kl_coef = kl_ctl.value
        targets = algo.targets(batch, cfg.rl, kl_coef, algo_state)

        # 6. update the adapters (and value head)
        with timer("train"):
            train_stats = update(models, run.updater, batch, targets, cfg, kl_coef, rollout, algo)
        bad_steps = bad_steps + 1 if train_stats.get("skipped_updates", 0) else 0
        if bad_steps >= cfg.train.max_bad_steps:
            raise FloatingPointError(f"{bad_steps} steps in a row had a non-finite loss or gradient, or a step "
                                     "that made the adapters non-finite (each one skipped and undone); stopping")

        # 7. log, evaluate, checkpoint
        record = step_record(run, step, batch, scores, kl_coef, reward_stats,
                             {**sampled.stats, **targets.stats, **train_stats, **getattr(rollout, "stats", {})})
        kl_ctl.update(record["kl"], cfg.rollout.num_sequences * world)  # adaptive controller (Ziegler et al. 2019)
        if held_out and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            record.update(evaluation(run, step + 1, keep=True))  # eval_reward_mean, ...; best/ (train.keep_best)
        record.update(step_timing(timer, t0, cpu0, batch.response_mask, accelerator))
        writer.write(record)
        if cfg.train.trackers:
            accelerator.log(record, step=step)
        _show(bar, record, cfg, accelerator.is_main_process and (step + 1) % cfg.train.log_every == 0)
        if accelerator.is_main_process and cfg.train.samples_every and (step + 1) % cfg.train.samples_every == 0:
            bar.write(writer.write_samples(step, prompts_seen(tokenizer, rollout), rollout.completions,
                                          scores.tolist()))
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            # collective; atomic: a crash here keeps the previous checkpoints
            save_checkpoint(run.train_state(), accelerator, cfg.output_dir, step + 1, cfg.train.keep_last)
        steps_done = step + 1

    bar.close()
    summary["steps"] = steps_done
    summary["train_seconds"] = time.perf_counter() - t_start
    return after_training(run, summary)  # the evaluation after training, final/ adapters, summary.json


def draw(run: Run, timer: Timer) -> Drawn | None:
    """Stages 1-3 for one batch of prompts; None once the prompt source has ended."""
    cfg, accelerator = run.cfg, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    # 1. prompts: this rank's slice of the global batch, each prompt repeated k times (rows k*i..k*i+k-1)
    global_rows = run.stream.next_batch(cfg.rollout.batch_size * world)
    if global_rows is None:
        return None
    my_rows = global_rows[rank * cfg.rollout.batch_size : (rank + 1) * cfg.rollout.batch_size]
    my_rows = [row for row in my_rows for _ in range(cfg.rollout.num_samples)]

    # 2. generate with the policy adapter (env.name: whole episodes, the environment answering each turn)
    with timer("generate"):
        texts, rollout, columns = play(run.models, run.tokenizer, my_rows, cfg, cfg.rollout, scores_too=True)

    # 3. score: reward functions see the raw prompt text and every other column (episodes: env_reward)
    with timer("score"):
        scores, reward_stats = run.scorer(texts, rollout.completions, columns)
    return Drawn(texts, rollout, columns, scores, reward_stats)


def before_training(run: Run) -> tuple[MetricsWriter, dict[str, Any]]:
    """Before the first step: the run's files (a fresh run's old ones go, a new run id; config.yaml), the metrics
    writer, trackers, and the evaluation before training."""
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.wait_for_everyone()  # every rank has checked output_dir (setup) before the main process writes it
    if accelerator.is_main_process:
        start_run(cfg, run.resumed_from)
    writer = MetricsWriter(cfg.output_dir, enabled=accelerator.is_main_process, resume_step=run.start_step)
    if cfg.train.trackers:
        accelerator.init_trackers("pefrl", config=_flat(cfg.to_dict()))
    summary: dict[str, Any] = {"algo": cfg.algo, "steps": 0}
    if run.eval_rows:
        metrics = evaluation(run, run.start_step)
        if cfg.train.keep_best:
            best_metric(metrics, cfg.train.keep_best)  # a misspelt metric stops here, not at the first evaluation
        summary["eval_before"], summary["eval_before_metrics"] = metrics["eval_reward_mean"], metrics
        accelerator.print(f"eval before training: {_eval_line(metrics)}")
    return writer, summary


def after_training(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """After the last step: the evaluation after training, then rank 0 writes final/ and summary.json."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.eval_rows:
        metrics = evaluation(run, summary["steps"])
        summary["eval_after"], summary["eval_after_metrics"] = metrics["eval_reward_mean"], metrics
        accelerator.print(f"eval after training: {_eval_line(metrics)}")
    if run.best:
        summary["best"] = dict(run.best)
        accelerator.print(f"best {run.best['metric']} {run.best['value']:.3f} at step {run.best['step']}: "
                          f"{Path(cfg.output_dir) / 'best'}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapters(run.models, Path(cfg.output_dir) / "final")
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    run.scorer.close()  # reward worker processes, if any (on an error they go when the Scorer is collected or at exit)
    return summary


def evaluation(run: Run, step: int, keep: bool = False) -> dict[str, float]:
    """The held-out evaluation (evaluation.evaluate) after `step` steps, as metrics.jsonl fields: eval_reward_mean,
    eval_reward/<function>, eval_pass@k, ... keep: also let train.keep_best keep these adapters in best/ when
    they are the best so far. A collective."""
    cfg = run.cfg
    metrics = evaluate(run.models, run.tokenizer, run.eval_rows, cfg, run.scorer, run.accelerator, step)
    metrics = {f"eval_{k}": v for k, v in metrics.items()}
    if keep and cfg.train.keep_best:
        keep_best(run.models, run.accelerator, cfg.output_dir, run.best, cfg.train.keep_best, metrics, step)
    return metrics


def _eval_line(metrics: dict[str, float]) -> str:
    """'0.412' (greedy), then any sampled metric: '0.412 (pass@1 0.380, pass@4 0.700, mean@4 0.380)'."""
    sampled = [f"{k[len('eval_'):]} {v:.3f}" for k, v in metrics.items() if k.startswith(("eval_pass@", "eval_mean@"))]
    return f"{metrics['eval_reward_mean']:.3f}" + (f" ({', '.join(sampled)})" if sampled else "")


def _show(bar: tqdm, record: dict[str, Any], cfg: Config, progress: bool) -> None:
    """Advance the progress bar; `progress`: also print the step's one-line summary."""
    bar.update(1)
    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}",
                    tok_s=f"{record['gen_tokens_per_s']:.0f}", refresh=False)
    if progress:
        bar.write(progress_line(record, cfg.train.steps))


def step_record(run: Run, step: int, batch: RolloutBatch, scores: torch.Tensor, kl_coef: float,
                reward_stats: dict[str, float], stats: dict[str, float]) -> dict[str, Any]:
    """The metrics.jsonl line of a step: global reward and sequence KL (summed over tokens), the Scorer's stats
    over every rank (a collective), plus `stats`."""
    cfg, accelerator = run.cfg, run.accelerator
    reward_stats = reduce_stats(reward_stats, len(scores), lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu())
    policy_logprobs = batch.policy_logprobs if batch.policy_logprobs is not None else batch.logprobs  # pi, not mu
    kl_seq = (kl_estimate(policy_logprobs, batch.ref_logprobs, cfg.rl.kl_estimator) * batch.response_mask).sum(-1)
    return {
        "step": step,
        "reward_mean": accelerator.reduce(scores.mean(), "mean").item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl": accelerator.reduce(kl_seq.mean(), "mean").item(),
        "kl_coef": kl_coef,
        "response_length": batch.response_mask.sum(-1).mean().item(),
        **stats,  # targets, update (policy_loss, value_loss, ...), episode stats
        **reward_stats,  # rewards per function, failures, batch retries
        # the sampling policy's, over the rollout's tokens, for every algorithm; not the update's, which only
        # exists when an entropy bonus needs it
        "entropy": masked_mean(batch.entropy, batch.response_mask).item(),
        "lr": run.scheduler.get_last_lr()[0],
    }


def step_timing(timer: Timer, t0: float, cpu0: float, response_mask: torch.Tensor,
            accelerator: Accelerator) -> dict[str, float]:
    step_time = time.perf_counter() - t0
    tokens = accelerator.reduce(response_mask.sum(), "sum").item()
    gen = timer.times.get("generate", 0.0)
    return {
        "step_time_s": step_time,
        # CPU seconds of this process (all its threads): on a shared machine, unlike wall time, barely moved by
        # other jobs; with one thread, about the wall time the step would take alone
        "step_cpu_s": time.process_time() - cpu0,
        "gen_time_s": gen,
        "score_time_s": timer.times.get("score", 0.0),
        "reference_time_s": timer.times.get("reference", 0.0),
        "train_time_s": timer.times.get("train", 0.0),
        "gen_tokens_per_s": tokens / gen if gen > 0 else 0.0,
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
