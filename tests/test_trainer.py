"""The whole loop on the embedded model: outputs, frozen base, adapters changed, reference = base."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pefrl.config_loader import load_config
from pefrl.forward import critic_values, policy_forward, reference_logprobs
from pefrl.models import resolve_model_path
from pefrl.scoring import Critic
from pefrl.trainer import setup, train
from pefrl.update import micro_backward

REQUIRED = ("step", "reward_mean", "kl", "entropy", "policy_loss", "value_loss", "step_time_s", "step_cpu_s",
            "gen_tokens_per_s")


@pytest.mark.parametrize("critic", ["adapter", "shared"])
def test_train_changes_only_adapters_and_writes_outputs(tmp_path, critic):
    torch.set_num_threads(1)
    cfg = load_config("recipes/configs/arithmetic_ppo.yaml", [
        f"output_dir={tmp_path}", "train.steps=2", "train.samples_every=1", "rollout.batch_size=16",
        "rl.minibatch_size=8", "data.eval_size=16", "train.eval_every=1", f"model.critic={critic}"])
    run = setup(cfg)
    peft_model = run.models.model
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainable_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    head_before = [p.detach().clone() for p in run.models.value_head.parameters()]
    assert trainable_before and all("lora_" in n for n in trainable_before)

    summary = train(cfg, run=run)

    for n, p in peft_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    assert any(not torch.equal(p, trainable_before[n]) for n, p in peft_model.named_parameters() if n in trainable_before)
    assert any(not torch.equal(a, b) for a, b in zip(run.models.value_head.parameters(), head_before))

    # reference = the untouched base model, loaded fresh from disk
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model)).eval()
    ids = torch.tensor([[0, 0, 5 + 3, 13, 7, 31, 9, 9], [22, 23, 13, 24, 31, 25, 27, 2]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = reference_logprobs(run.models, ids, mask, 6, 1.0)
        logits = plain(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(logits[:, 5:-1].float(), -1).gather(-1, ids[:, 6:, None])[..., 0]
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-5)

    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for key in REQUIRED:
        assert all(isinstance(r[key], (int, float)) for r in records), key
    assert "eval_reward_mean" in records[-1] and "eval_after" in summary
    assert (tmp_path / "final" / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "final" / "value_head.safetensors").exists()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 16


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config("recipes/configs/arithmetic_a2c.yaml", [
        f"output_dir={tmp_path}", "train.steps=2", "rollout.batch_size=8", "rl.minibatch_size=8",
        "data.eval_prompts=", "train.trackers=[tensorboard]"])
    train(cfg)
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_online_prompt_source_trains_until_it_ends(tmp_path):
    """Prompts from a generator (arriving while training runs): the run stops when the source ends."""
    from pefrl.tasks.arithmetic import problems

    seen = []

    def arriving():
        for row in problems("train")[:20]:  # 20 prompts = 2 steps of 8, then 4 left over: not a full batch
            seen.append(row["prompt"])
            yield row

    cfg = load_config("recipes/configs/arithmetic_a2c.yaml", [
        f"output_dir={tmp_path}", "train.steps=10", "rollout.batch_size=8", "rl.minibatch_size=8",
        "data.eval_prompts="])
    summary = train(cfg, prompt_source=arriving())
    assert summary["steps"] == 2 and len(seen) == 20
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_separate_critic_backward_gives_the_joint_gradients(tmp_path, algo):
    """update.micro_backward backpropagates the critic adapter's loss before the policy's forward (half the
    activation memory); the gradients must equal those of one backward of the summed loss."""
    torch.set_num_threads(1)
    cfg = load_config(f"recipes/configs/arithmetic_{algo}.yaml", [f"output_dir={tmp_path}", "rl.entropy_coef=0.1"])
    run = setup(cfg)
    models, params = run.models, run.params
    with torch.no_grad():
        for n, p in models.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (4, 9), generator=g)
    mask, P = torch.ones_like(ids), 4
    T = ids.shape[1] - P
    mb = {"response_mask": torch.ones(4, T), "logprobs": -torch.rand(4, T, generator=g) * 3,
          "ref_logprobs": -torch.rand(4, T, generator=g) * 3, "advantages": torch.randn(4, T, generator=g),
          "returns": torch.randn(4, T, generator=g), "values": torch.randn(4, T, generator=g)}

    logprobs, entropy, _ = policy_forward(models, ids, mask, P, cfg.rollout.temperature)
    values = critic_values(models, ids, mask, P)
    loss, joint_stats = run.algo.loss(mb, logprobs, values, entropy, cfg.rl, 0.05, cfg.max_policy_tokens)
    (loss * 0.5).backward()
    joint = [p.grad.clone() for p in params]
    run.optimizer.zero_grad(set_to_none=True)

    stats = micro_backward(models, run.algo, Critic.of(models) if run.algo.uses_critic else None, mb,
                           (ids, mask, P, None), cfg, 0.05, 0.5)
    for p, expected in zip(params, joint):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in joint[:1]) and any(p.grad.abs().sum() > 0 for p in models.value_head.parameters())
    for k, v in joint_stats.items():
        torch.testing.assert_close(torch.as_tensor(stats[k]), torch.as_tensor(v), rtol=1e-5, atol=1e-6)


def test_without_an_entropy_bonus_the_update_skips_the_entropy(tmp_path):
    """rl.entropy_coef 0: policy_forward(with_entropy=False) returns no entropy and the same logprobs, and
    micro_backward's gradients equal those of the loss with the entropy computed (its coefficient is 0)."""
    cfg = load_config("recipes/configs/arithmetic_grpo.yaml", [f"output_dir={tmp_path}", "rl.entropy_coef=0"])
    run = setup(cfg)
    models = run.models
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (2, 8), generator=g)
    mask, P = torch.ones_like(ids), 3
    lp, ent, _ = policy_forward(models, ids, mask, P, 1.0)
    lp_off, ent_off, _ = policy_forward(models, ids, mask, P, 1.0, with_entropy=False)
    assert ent_off is None and ent.grad_fn is not None and lp_off.grad_fn is not None
    torch.testing.assert_close(lp_off, lp, rtol=0, atol=0)

    T = ids.shape[1] - P
    mb = {"response_mask": torch.ones(2, T), "logprobs": lp.detach() - 0.1, "ref_logprobs": lp.detach() - 0.2,
          "advantages": torch.randn(2, T, generator=g)}
    loss, _ = run.algo.loss(mb, lp, None, ent, cfg.rl, 0.05, cfg.max_policy_tokens)
    params = [p for p in run.params if p.requires_grad]
    expected = torch.autograd.grad(loss, params, allow_unused=True)
    micro_backward(models, run.algo, Critic.of(models) if run.algo.uses_critic else None, mb,
                           (ids, mask, P, None), cfg, 0.05, 1.0)
    used = [(p.grad, e) for p, e in zip(params, expected) if e is not None]
    assert used and any(e.abs().sum() > 0 for _, e in used)
    for grad, e in used:
        torch.testing.assert_close(grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algo", ["a2c", "ppo"])
def test_a_one_pass_update_reuses_the_critic_forward(tmp_path, monkeypatch, algo):
    """When the update's first micro-batch is the whole rollout, the critic adapter runs once per step, not
    twice (no-grad values, then again with grad), and the step ends where the two-forward path ends (ppo with
    gradient checkpointing: the kept graph is recomputed in the update, under the critic adapter)."""
    import pefrl.scoring as scoring

    calls = []
    real = scoring.critic_values
    monkeypatch.setattr(scoring, "critic_values", lambda *a: calls.append(1) or real(*a))
    common = ["train.steps=1", "data.eval_prompts=null", "rollout.batch_size=8", "rl.minibatch_size=8",
              "rl.epochs=1", "model.critic=adapter", f"model.gradient_checkpointing={algo == 'ppo'}"]

    def one_step(name):
        cfg = load_config(f"recipes/configs/arithmetic_{algo}.yaml", [f"output_dir={tmp_path / name}", *common])
        run = setup(cfg)
        calls.clear()
        train(cfg, run=run)
        return len(calls), [p.detach().clone() for p in run.params]

    fused_calls, fused = one_step("fused")
    monkeypatch.setattr(scoring, "_values_for_one_pass", lambda *a: None)
    plain_calls, plain = one_step("plain")
    assert (fused_calls, plain_calls) == (1, 2)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fresh_cfg = load_config(f"recipes/configs/arithmetic_{algo}.yaml", [f"output_dir={tmp_path / 'fresh'}", *common])
    initial = [p.detach() for p in setup(fresh_cfg).params]
    assert any(not torch.equal(a, b) for a, b in zip(fused, initial))  # the step did train


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_top_layers_critic_starts_from_the_samplers_hidden_states(tmp_path, monkeypatch, one_pass):
    """model.critic_layers: every critic forward of a step (the no-grad values or the kept one-pass forward, and
    the update's) starts from the sampler's reference-row hidden states, and the first optimizer step gets the
    gradients the critic's whole forward gives."""
    import pefrl.scoring as scoring
    import pefrl.trainer as trainer
    from pefrl.updater import Updater

    calls, grads = [], []
    real_values, real_step = scoring.critic_values, Updater.step
    monkeypatch.setattr(scoring, "critic_values", lambda *a: calls.append(a[4] is not None) or real_values(*a))
    monkeypatch.setattr(Updater, "step",
                        lambda self, *a: grads.append([p.grad.clone() for p in self.params]) or real_step(self, *a))
    mb, epochs = (8, 1) if one_pass else (4, 2)
    common = ["train.steps=1", "data.eval_prompts=null", "rollout.batch_size=8", f"rl.minibatch_size={mb}",
              f"rl.epochs={epochs}", "model.critic=adapter", "model.critic_layers=1"]

    def one_step(name):
        cfg = load_config("recipes/configs/arithmetic_ppo.yaml", [f"output_dir={tmp_path / name}", *common])
        run = setup(cfg)
        calls.clear()
        grads.clear()
        train(cfg, run=run)
        return list(calls), grads[0]

    from_sampler, first_grads = one_step("from_sampler")
    real_play = trainer.play

    def play_without_critic_inputs(*a, **k):
        texts, rollout, columns = real_play(*a, **k)
        rollout.critic_inputs = None
        return texts, rollout, columns

    monkeypatch.setattr(trainer, "play", play_without_critic_inputs)
    whole, whole_grads = one_step("whole")
    # one pass: the kept forward alone; else the no-grad values, then 2 epochs x 2 minibatches of 4
    assert len(from_sampler) == 1 if one_pass else len(from_sampler) >= 5
    assert all(from_sampler) and whole == [False] * len(from_sampler)
    scale = max(g.abs().max() for g in whole_grads)
    assert scale > 0
    for a, b in zip(first_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
