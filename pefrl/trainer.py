"""The online RL loop: one flat function in numbered stages, the only place that touches the Accelerator.

    1. prompts     this rank's slice of the global batch, each repeated rollout.num_samples times
    2. generate    policy adapter, left-padded batches, KV cache
    3. score       reward functions and/or reward model -> scores (B,)
    4. no-grad     old logprobs (policy), reference logprobs (adapters off), values (critic)
    5. targets     KL-shaped rewards and advantages, by the algorithm's registered function
    6. update      epochs x minibatches x micro-batches, only adapter and value-head parameters
    7. log         metrics.jsonl, progress line, trackers; evaluation and checkpoints

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
from pefrl.algorithms import Algorithm, RolloutBatch, get_algorithm, loss_inputs
from pefrl.arch import context_length
from pefrl.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from pefrl.config import Config
from pefrl.data import PromptStream, check_prompt_lengths, format_prompt, load_rows
from pefrl.distributed import RankGuard, check_supported
from pefrl.envs import env_rewards, play_rows, seed_rows
from pefrl.envs import eval_rows as env_eval_rows
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.fsdp import check_fsdp, fsdp_requested, shard_models, trim_eval_rows
from pefrl.metrics import MetricsWriter, Timer, progress_line
from pefrl.models import Models, load_models, load_tokenizer
from pefrl.ops.advantages import masked_mean
from pefrl.ops.kl import kl_estimate, make_kl_controller
from pefrl.rewards import Scorer, build_scorer, reduce_stats
from pefrl.rollout import Rollout, generate, use_pefrl_engine
from pefrl.rundir import resolve_run, start_run
from pefrl.startline import start_line


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
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: Any
    algo_state: dict[str, float] = field(default_factory=dict)
    start_step: int = 0
    resumed_from: Path | None = None


def setup(
    cfg: Config,
    extra_rewards: Sequence[tuple[str, Callable]] = (),
    prompt_source: Iterable[dict[str, Any]] | None = None,
) -> Run:
    """Load the base once, add adapters, build reward, data, optimizer and KL controller."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.train.trackers or None,
                              project_dir=cfg.output_dir)
    check_supported(accelerator)  # DeepSpeed / Megatron would shard nothing here: stop, don't run unsharded
    resumed_from = resolve_run(cfg)  # None: fresh; refuses a used output_dir or a changed config before loading
    sharded = fsdp_requested(accelerator)
    if sharded:
        check_fsdp(cfg, fsdp_ok=get_algorithm(cfg.algo).update is None)
    algo = get_algorithm(cfg.algo)
    torch.manual_seed(cfg.train.seed)  # identical adapter and value-head init on every rank
    tokenizer = load_tokenizer(cfg.model)
    models = load_models(cfg.model, cfg.lora, uses_critic=algo.uses_critic)
    if sharded:  # FSDP2: the base sharded over ranks, adapters and value head replicated (pefrl/fsdp.py)
        shard_models(models, accelerator.device)
        # at setup, not at the first rollout: the lean decoder reads layer weights directly, never where FSDP
        # gathers them, so engine 'pefrl' raises here naming the sharded base ('auto' falls back to generate)
        use_pefrl_engine(models, cfg.rollout)
    models.model.to(accelerator.device)
    if models.value_head is not None:
        models.value_head.to(accelerator.device)
    accelerator.print(start_line(cfg, models, accelerator.num_processes, accelerator.device))
    scorer = build_scorer(cfg.reward, [*env_rewards(cfg.env), *extra_rewards])
    if cfg.env.name:  # rows are environment seeds; the environment writes the prompts (pefrl/envs.py)
        rows, eval_rows = seed_rows(cfg.train.seed), _eval_rows(cfg)
    else:
        rows = prompt_source if prompt_source is not None else load_rows(cfg.data.prompts, cfg.data.prompt_field, cfg.data.split, "data.prompts")
        positions = context_length(models.model.config)  # prompts that do not fit are an error, named by row index
        rows = check_prompt_lengths(rows, tokenizer, cfg.data, cfg.rollout.max_new_tokens, positions,
                                    source=cfg.data.prompts if prompt_source is None else "prompt_source")
        eval_rows = check_prompt_lengths(_eval_rows(cfg), tokenizer, cfg.data, cfg.rollout.max_new_tokens, positions,
                                         source=str(cfg.data.eval_prompts))
    if sharded:
        eval_rows = trim_eval_rows(eval_rows, accelerator.num_processes)  # equal generate calls on every rank
    params = models.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    run = Run(cfg=cfg, accelerator=accelerator, algo=algo, tokenizer=tokenizer, models=models, scorer=scorer,
              stream=PromptStream(rows, seed=cfg.train.seed, shuffle=cfg.data.shuffle), eval_rows=eval_rows,
              params=params, optimizer=optimizer, scheduler=scheduler, kl_ctl=make_kl_controller(cfg.rl))
    run.resumed_from = resumed_from
    if run.resumed_from is not None:
        run.start_step = load_checkpoint(run, run.resumed_from)
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
    accelerator, algo, models, tokenizer, scorer = run.accelerator, run.algo, run.models, run.tokenizer, run.scorer
    stream, eval_rows, kl_ctl, algo_state = run.stream, run.eval_rows, run.kl_ctl, run.algo_state
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # distinct samples per rank
    accelerator.wait_for_everyone()  # every rank has checked output_dir (setup) before the main process writes it
    if accelerator.is_main_process:
        start_run(cfg, run.resumed_from)  # fresh: the run's old files go, a new run id; config.yaml
    writer = MetricsWriter(cfg.output_dir, enabled=accelerator.is_main_process, resume_step=run.start_step)
    if cfg.train.trackers:
        accelerator.init_trackers("pefrl", config=_flat(cfg.to_dict()))

    summary: dict[str, Any] = {"algo": cfg.algo, "steps": 0}
    if eval_rows:
        summary["eval_before"] = evaluate(models, tokenizer, eval_rows, cfg, scorer, accelerator)
        accelerator.print(f"eval before training: {summary['eval_before']:.3f}")
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
            # 1. prompts: this rank's slice of the global batch, each prompt repeated k times (rows k*i..k*i+k-1)
            global_rows = stream.next_batch(cfg.rollout.batch_size * world)
            if global_rows is None:
                accelerator.print(f"prompt source ended after {step} steps")
                break
            my_rows = global_rows[rank * cfg.rollout.batch_size : (rank + 1) * cfg.rollout.batch_size]
            my_rows = [row for row in my_rows for _ in range(cfg.rollout.num_samples)]

            # 2. generate with the policy adapter (env.name: whole episodes, the environment answering each turn)
            with timer("generate"):
                texts, rollout, columns = _play(models, tokenizer, my_rows, cfg, cfg.rollout, scores_too=True)

            # 3. score: reward functions see the raw prompt text and every other column (episodes: env_reward)
            with timer("score"):
                scores, reward_stats = scorer(texts, rollout.completions, columns)

        # 4. old logprobs, reference logprobs and values, without grad (a critic adapter's values keep their
        #    graph when the update's one pass covers the rollout: _values_for_one_pass)
        with timer("reference"):
            values_graph = _values_for_one_pass(run, rollout) if algo.update is None else None
            batch, entropy = _no_grad_pass(models, rollout, scores.to(accelerator.device), cfg, algo.uses_critic)

        # 5. rewards and advantages
        kl_coef = kl_ctl.value
        targets = algo.targets(batch, cfg.rl, kl_coef, algo_state)

        # 6. update the adapters (and value head)
        with timer("train"):
            if algo.update is not None:  # TRPO: its own update
                train_stats = algo.update(run, batch, targets, kl_coef, rollout)
            else:
                train_stats = _update(run, batch, targets, kl_coef, rollout, values_graph)
        bad_steps = bad_steps + 1 if train_stats.get("skipped_updates", 0) else 0
        if bad_steps >= cfg.train.max_bad_steps:
            raise FloatingPointError(f"{bad_steps} steps in a row had a non-finite loss or gradient; stopping")

        # 7. log, evaluate, checkpoint
        reward_stats = reduce_stats(reward_stats, len(scores),  # every rank's, not rank 0's: a collective
                                    lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu())
        record = _step_record(run, step, batch, entropy, scores, kl_coef, {**targets.stats, **train_stats,
                                                                            **reward_stats, **getattr(rollout, "stats", {})})
        kl_ctl.update(record["kl"], cfg.rollout.num_sequences * world)  # adaptive controller (Ziegler et al. 2019)
        if eval_rows and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            record["eval_reward_mean"] = evaluate(models, tokenizer, eval_rows, cfg, scorer, accelerator)
        record.update(_timing(timer, t0, cpu0, batch.response_mask, accelerator))
        writer.write(record)
        if cfg.train.trackers:
            accelerator.log(record, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}",
                        tok_s=f"{record['gen_tokens_per_s']:.0f}", refresh=False)
        if accelerator.is_main_process and (step + 1) % cfg.train.log_every == 0:
            bar.write(progress_line(record, cfg.train.steps))
        if accelerator.is_main_process and cfg.train.samples_every and (step + 1) % cfg.train.samples_every == 0:
            bar.write(writer.write_samples(step, texts, rollout.completions, scores.tolist()))
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            save_checkpoint(run, step + 1)  # collective; atomic: a crash here keeps the previous checkpoints
        steps_done = step + 1

    bar.close()
    summary["steps"] = steps_done
    summary["train_seconds"] = time.perf_counter() - t_start
    if eval_rows:
        summary["eval_after"] = evaluate(models, tokenizer, eval_rows, cfg, scorer, accelerator)
        accelerator.print(f"eval after training: {summary['eval_after']:.3f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapters(models, Path(cfg.output_dir) / "final")
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    scorer.close()  # reward worker processes, if any (on an error they go when the Scorer is collected or at exit)
    return summary


def _step_record(run: Run, step: int, batch: RolloutBatch, entropy: torch.Tensor, scores: torch.Tensor,
                 kl_coef: float, stats: dict[str, float]) -> dict[str, Any]:
    """The metrics.jsonl line of a step: global reward and sequence KL (summed over tokens), plus `stats`."""
    cfg, accelerator = run.cfg, run.accelerator
    policy_logprobs = batch.policy_logprobs if batch.policy_logprobs is not None else batch.logprobs  # pi, not mu
    kl_seq = (kl_estimate(policy_logprobs, batch.ref_logprobs, cfg.rl.kl_estimator) * batch.response_mask).sum(-1)
    return {
        "step": step,
        "reward_mean": accelerator.reduce(scores.mean(), "mean").item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl": accelerator.reduce(kl_seq.mean(), "mean").item(),
        "kl_coef": kl_coef,
        "response_length": batch.response_mask.sum(-1).mean().item(),
        **stats,  # targets, update (policy_loss, value_loss, ...), rewards per function, episode stats
        # the sampling policy's, over the rollout's tokens, for every algorithm; not the update's, which only
        # exists when an entropy bonus needs it
        "entropy": masked_mean(entropy, batch.response_mask).item(),
        "lr": run.scheduler.get_last_lr()[0],
    }


def _play(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, rollout_cfg,
          scores_too: bool = False) -> tuple[list[str], Rollout, dict]:
    """Completions for `rows`: prompts through the chat template, or whole episodes when env.name is set.
    scores_too: let the sampler also score the reference and the critic's values, where it can
    (rollout.generate; the no-grad pass fills in what it could not).
    -> (raw prompt texts, rollout, extra columns for the reward functions)."""
    if cfg.env.name:
        return play_rows(models, tokenizer, rows, rollout_cfg, cfg.env)
    texts = [row[cfg.data.prompt_field] for row in rows]
    prompts = [format_prompt(tokenizer, t, cfg.data.chat_template) for t in texts]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != cfg.data.prompt_field}
    rollout = generate(models, tokenizer, prompts, rollout_cfg, with_reference=scores_too,
                       with_values=scores_too and models.critic == "shared",  # a critic adapter: its own forward
                       with_critic_inputs=scores_too and models.critic_from is not None)
    return texts, rollout, columns


def _eval_rows(cfg: Config) -> list[dict[str, Any]]:
    if not cfg.data.eval_prompts:
        return []
    if cfg.env.name:
        return env_eval_rows(cfg.data.eval_size)  # held-out environment seeds
    return load_rows(cfg.data.eval_prompts, cfg.data.prompt_field, cfg.data.split, "data.eval_prompts")[: cfg.data.eval_size]


@torch.no_grad()
def _no_grad_pass(models: Models, rollout: Rollout, scores: torch.Tensor, cfg: Config, uses_critic: bool):
    """Old logprobs, reference logprobs and values for the whole rollout, micro-batch by micro-batch.

    The old logprobs and entropy come from generation (`Rollout.logprobs`, recorded while sampling), so the
    policy runs a forward here only where something else needs it: the shared critic's values, or a rollout
    that recorded nothing (multi-turn episodes). Likewise the reference forward runs only where the sampler did
    not score the reference itself (`Rollout.ref_logprobs`, the pefrl engine), and the critic forward only where
    it did not score the values (`Rollout.values`)."""
    temperature, T = cfg.rollout.temperature, rollout.response_ids.shape[1]
    old, ref, values, entropy = [], [], [], []
    shared, chunk = models.critic == "shared", cfg.model.logits_chunk_size
    critic_pass = uses_critic and rollout.values is None
    policy_pass = rollout.logprobs is None or (critic_pass and shared)
    reference_pass = rollout.ref_logprobs is None
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # (b, t) -> (b, T)
    any_pass = policy_pass or reference_pass or critic_pass  # the pefrl engine usually leaves nothing to do
    for idx in torch.arange(len(rollout.response_ids)).split(cfg.rl.micro_batch_size) if any_pass else ():
        ids, mask, P, critic_inputs = _micro_inputs(rollout, idx)
        if policy_pass:
            lp, ent, v = policy_forward(models, ids, mask, P, temperature, with_values=critic_pass and shared,
                                        chunk_size=chunk)
            old.append(pad(lp))
            entropy.append(pad(ent))
        if reference_pass:
            ref.append(pad(reference_logprobs(models, ids, mask, P, temperature, chunk_size=chunk)))
        if critic_pass:
            values.append(pad(v if shared else critic_values(models, ids, mask, P, critic_inputs)))
    response_mask = rollout.response_mask
    logprobs, entropy = (torch.cat(old), torch.cat(entropy)) if policy_pass else (rollout.logprobs, rollout.entropy)
    policy_logprobs = None
    if rollout.behaviour_logprobs is not None:
        # Epsilon-greedy sampled from a mixture, not from the policy: the ratio must use the behaviour logprobs,
        # the KL to the reference the policy's own.
        policy_logprobs, logprobs = logprobs * response_mask, rollout.behaviour_logprobs
    batch = RolloutBatch(
        response_mask=response_mask,
        logprobs=logprobs * response_mask,
        policy_logprobs=policy_logprobs,
        ref_logprobs=(torch.cat(ref) if reference_pass else rollout.ref_logprobs) * response_mask,
        scores=scores,
        values=(torch.cat(values) if critic_pass else rollout.values) * response_mask if uses_critic else None,
        num_samples=cfg.rollout.num_samples,
    )
    return batch, entropy


def _passes(cfg: Config, algo: Algorithm, n: int) -> tuple[int, int, int]:
    """(epochs, minibatch size, micro-batch size) of the update of a rollout of n rows."""
    epochs, mb_size = (1, n) if algo.single_update else (cfg.rl.epochs, cfg.rl.minibatch_size)
    return epochs, mb_size, min(cfg.rl.micro_batch_size, mb_size)


def _values_for_one_pass(run: Run, rollout: Rollout) -> torch.Tensor | None:
    """The critic adapter's values (n, T) of the whole rollout WITH their graph, when the update's first
    micro-batch will be the whole rollout (A2C, or PPO with rl.minibatch_size >= the rollout and no gradient
    accumulation). That micro-batch's critic forward would be this one again (same rows, same parameters), so
    the update reuses this graph instead and the no-grad critic forward is skipped: the old values are these,
    detached, set as `rollout.values`. None (nothing done) in every other case."""
    cfg, algo, models = run.cfg, run.algo, run.models
    n = len(rollout.response_ids)
    if not algo.uses_critic or models.critic != "adapter" or rollout.values is not None:
        return None
    if _passes(cfg, algo, n)[2] < n:
        return None
    ids, mask, P, critic_inputs = _micro_inputs(rollout, torch.arange(n))
    values = critic_values(models, ids, mask, P, critic_inputs)  # (n, T'), T' <= T, trimmed as in the update
    rollout.values = torch.nn.functional.pad(values.detach(), (0, rollout.response_ids.shape[1] - values.shape[1]))
    return values


def _update(run: Run, batch: RolloutBatch, targets, kl_coef: float, rollout: Rollout,
            values_graph: torch.Tensor | None = None) -> dict[str, float]:
    """Epochs x minibatches of optimizer steps; each minibatch is split into micro-batches for memory.
    values_graph: the critic's values of every row with their graph (_values_for_one_pass), used by the first
    micro-batch, which then holds every row."""
    cfg, algo, models = run.cfg, run.algo, run.models
    tensors = loss_inputs(batch, targets)
    n = len(batch.response_mask)
    epochs, mb_size, micro = _passes(cfg, algo, n)
    totals: dict[str, float] = {}
    count, skipped = 0, 0
    for _ in range(epochs):
        for mb_idx in torch.randperm(n).split(mb_size):
            run.optimizer.zero_grad(set_to_none=True)
            for micro_idx in mb_idx.split(micro):
                ids, _, P, _ = inputs = _micro_inputs(rollout, micro_idx)
                T = ids.shape[1] - P
                mb = {k: v[micro_idx, :T] for k, v in tensors.items()}  # (b, T) trimmed like the inputs
                values = values_graph[micro_idx] if values_graph is not None else None  # (n, T) in this order
                values_graph = None  # one use: later passes see updated parameters
                stats = _backward(models, algo, mb, inputs, cfg, kl_coef, len(micro_idx) / len(mb_idx), values)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * len(micro_idx) / len(mb_idx)
            count += 1
            skipped += not _optimizer_step(run)
    out = {k: v / count for k, v in totals.items()}
    out["skipped_updates"] = float(skipped)
    return out


def _micro_inputs(rollout: Rollout, idx: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
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


def _backward(models: Models, algo: Algorithm, mb: dict[str, torch.Tensor], inputs: tuple, cfg: Config,
              kl_coef: float, scale: float, values: torch.Tensor | None = None) -> dict[str, Any]:
    """Forward, loss and backward (loss * scale) of one micro-batch -> its stats. values: the critic adapter's
    values of these rows with their graph, when already computed (_values_for_one_pass).

    With a critic adapter the critic runs and backpropagates first, and its graph is freed before the policy's
    forward: the policy and value terms touch disjoint parameters and the advantages are fixed, so two backward
    passes give the gradients of one at about half the activation memory. The critic pass sees the old logprobs
    (and zero entropy) as detached stand-ins, so no gradient reaches the policy; the policy pass sees the values
    detached. Its stats are the run's: every input has its true value there.
    """
    ids, mask, P, critic_inputs = inputs
    loss_args = (cfg.rl, kl_coef, cfg.max_policy_tokens)
    shared = models.critic == "shared"
    if algo.uses_critic and not shared:
        values = critic_values(models, ids, mask, P, critic_inputs) if values is None else values  # (b, T)
        loss, _ = algo.loss(mb, mb["logprobs"], values, torch.zeros_like(values), *loss_args)
        (loss * scale).backward()
        values = values.detach()
    logprobs, entropy, shared_values = policy_forward(models, ids, mask, P, cfg.rollout.temperature,
                                                      with_values=algo.uses_critic and shared,
                                                      chunk_size=cfg.model.logits_chunk_size,
                                                      with_entropy=cfg.rl.entropy_coef > 0)
    if entropy is None:  # no bonus, so no (b, T, V) softmax passes for it; the step logs the sampling entropy
        entropy = torch.zeros_like(logprobs)
    loss, stats = algo.loss(mb, logprobs, values if values is not None else shared_values, entropy, *loss_args)
    (loss * scale).backward()
    return stats


def _optimizer_step(run: Run) -> bool:
    """Average grads over ranks, clip, step. A non-finite gradient skips the step (params untouched)."""
    params, accelerator, max_grad_norm = run.params, run.accelerator, run.cfg.train.max_grad_norm
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if accelerator.num_processes > 1:
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce for all adapter grads
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if not torch.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        return False
    run.optimizer.step()
    run.scheduler.step()
    return True


def _timing(timer: Timer, t0: float, cpu0: float, response_mask: torch.Tensor,
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


@torch.no_grad()
def evaluate(models: Models, tokenizer, rows: list[dict[str, Any]], cfg: Config, scorer: Scorer,
             accelerator: Accelerator | None = None) -> float:
    """Mean reward of greedy completions on held-out rows (each rank scores its shard)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    greedy = dataclasses.replace(cfg.rollout, top_k=1, epsilon=0.0)  # top-k 1 sampling is greedy decoding
    my_rows = rows[rank::world]
    total = torch.zeros(2)
    size = cfg.rollout.num_sequences
    for i in range(0, len(my_rows), size):
        chunk = my_rows[i : i + size]
        texts, rollout, columns = _play(models, tokenizer, chunk, cfg, greedy)
        scores, _ = scorer(texts, rollout.completions, columns)
        total += torch.tensor([scores.sum().item(), len(chunk)])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return (total[0] / total[1].clamp(min=1)).item()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
