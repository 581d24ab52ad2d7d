"""Multi-turn environments: the games, episode packing, and logprobs of the packed episode = logprobs at sampling."""

import itertools
from types import SimpleNamespace

import pytest
import torch

import pefrl.envs as envs_module
from pefrl.config import LoraConfig, ModelConfig, RolloutConfig
from pefrl.envs import EVAL_SEED_OFFSET, Environment, eval_rows, make_envs, rollout_episodes, seed_rows
from pefrl.rollout import Rollout, left_pad
from pefrl.tasks.games import GuessingGame, ShapedGuessingGame, TicTacToe, first_integer
from pefrl.tiny import build_tokenizer, save_tiny_model

torch.set_num_threads(1)


# ---- games ---------------------------------------------------------------------------------------------------


def test_first_integer():
    assert [first_integer(t) for t in ("12", " 7 apples", "x-3", "none", "")] == [12, 7, -3, None, None]


def test_guessing_game_answers_by_hand():
    game = GuessingGame(seed=0)
    assert game.reset() == "guess 1-20="
    assert game.secret == 13  # random.Random(0).randint(1, 20)
    assert game.step("12") == (" higher=", 0.0, False)
    assert game.step(" 14 ") == (" lower=", 0.0, False)
    assert game.step("no idea") == (" number=", 0.0, False)
    assert game.step("13") == ("correct", 1.0, True)
    assert game.guesses == [12, 14, None, 13]
    game.reset()  # the next episode draws its number from the same seeded stream
    assert game.guesses == [] and game.secret == 14  # the second randint(1, 20) of random.Random(0)


def test_shaped_guessing_game_rewards_by_hand():
    game = ShapedGuessingGame(seed=0)
    game.reset()  # secret 13, high 20, shaping 0.5
    # phi: before -1; 3 -> -10/20 = -0.5; 'x' -> -1; 15 -> -2/20 = -0.1; 13 -> 0
    steps = [game.step(t) for t in ("3", "x", "15", "13")]
    assert [(obs, done) for obs, _, done in steps] == [(" higher=", False), (" number=", False), (" lower=", False),
                                                        ("correct", True)]
    rewards = [r for _, r, _ in steps]
    assert rewards == pytest.approx([0.5 * 0.5, 0.5 * -0.5, 0.5 * 0.9, 1.0 + 0.5 * 0.1])
    assert sum(rewards) == pytest.approx(1.5)  # telescopes: 0.5 * (0 - (-1)) + 1.0
    game.reset()
    assert game.step("500")[1] == 0.0  # farther than `high` is clamped to phi = -1: no gain


def test_tic_tac_toe_win_illegal_and_opponent():
    game = TicTacToe(seed=1)
    assert game.reset() == "......... move="
    assert game.step("10") == ("illegal", 0.0, True)  # off the board forfeits
    game.reset()
    game.board = list("XX.OO....")
    assert game.step("3") == ("win", 1.0, True)  # top row
    game.reset()
    obs, reward, done = game.step("5")
    assert not done and reward == 0.0 and game.board.count("O") == 1 and game.board[4] == "X"
    assert obs == f" {''.join(game.board)} move="
    taken = game.board.index("O") + 1
    assert game.step(str(taken)) == ("illegal", 0.0, True)  # an occupied cell forfeits


class NoStep:
    def __init__(self, seed: int):
        pass

    def reset(self) -> str:
        return ""


def test_make_envs_repeats_seeds_and_checks_interface():
    envs = make_envs("pefrl.tasks.games:GuessingGame", [5, 6], num_samples=2)
    secrets = [(e.reset(), e.secret)[1] for e in envs]
    assert secrets[0] == secrets[1] and secrets[2] == secrets[3]  # a group shares its hidden number
    assert all(isinstance(e, Environment) for e in envs)
    with pytest.raises(TypeError, match="does not implement"):
        make_envs("tests.test_envs:NoStep", [0])
    with pytest.raises(ValueError, match="pkg.module:Class"):
        make_envs("GuessingGame", [0])


def test_seed_rows_are_distinct_and_held_out_apart():
    rows = list(itertools.islice(seed_rows(3), 4))
    assert rows == [{"seed": 3 * 1_000_003 + i} for i in range(4)]
    assert [r["seed"] for r in eval_rows(2)] == [EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 1]


# ---- packing, with a scripted policy ------------------------------------------------------------------------


class TwoTurnEnv:
    """Turn 1 gets 0.25 and the observation ' b='; turn 2 ends the episode with 1.0."""

    def __init__(self, seed: int = 0):
        self.turn = 0

    def reset(self) -> str:
        self.turn = 0
        return "1+1="

    def step(self, text: str):
        self.turn += 1
        return (" b=", 0.25, False) if self.turn == 1 else ("end", 1.0, True)


def _scripted_generate(tok, answers):
    """A stand-in for rollout.generate: encodes prompts as it does and answers `answers[turn]` + EOS."""
    calls = []

    def fake(models, tokenizer, prompts, cfg, generator=None, prompt_ids=None):
        if prompt_ids is None:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            query_ids, query_mask = enc.input_ids, enc.attention_mask
        else:  # later turns: the exact ids of the episode so far
            query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
        text = answers[len(calls)]
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        calls.append(prompts)
        response = torch.tensor([ids] * len(prompts))
        return Rollout(query_ids, query_mask, response, torch.ones(response.shape), [text] * len(prompts))

    return fake, calls


def test_episode_layout_masks_and_scores(monkeypatch):
    tok = build_tokenizer()
    fake, calls = _scripted_generate(tok, ["7", "42"])
    monkeypatch.setattr(envs_module, "generate", fake)
    models = SimpleNamespace(model=torch.nn.Linear(1, 1))
    out = rollout_episodes(models, tok, [TwoTurnEnv(), TwoTurnEnv()], RolloutConfig(), max_turns=4)

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    turn1, obs, turn2 = enc("7") + [eos], enc(" b="), enc("42") + [eos]
    assert out.query_ids[0].tolist() == enc("1+1=")
    assert out.response_ids[0].tolist() == turn1 + obs + turn2
    assert out.response_mask[0].tolist() == [1.0] * len(turn1) + [0.0] * len(obs) + [1.0] * len(turn2)
    assert out.attention_mask[0].tolist() == [1] * (len(enc("1+1=")) + len(turn1 + obs + turn2))
    assert out.scores.tolist() == [1.25, 1.25] and out.turns.tolist() == [2, 2]
    assert out.completions[0] == "7 b=42" and out.prompts == ["1+1=", "1+1="]
    assert calls[1] == ["1+1=7</s> b="] * 2  # turn 2's context as text (the ids are fed as they are)
    assert out.stats["env/observation_tokens"] == len(obs)


def test_episode_ends_when_the_next_turn_would_not_fit(monkeypatch):
    tok = build_tokenizer()
    monkeypatch.setattr(envs_module, "generate", _scripted_generate(tok, ["7", "42"])[0])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    used = len(enc("1+1=")) + len(enc("7")) + 1 + len(enc(" b="))  # prompt, turn 1 + EOS, observation
    cfg = RolloutConfig(max_new_tokens=3)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=used + 2),
                            parameters=lambda: iter([torch.zeros(1)]))
    out = rollout_episodes(SimpleNamespace(model=model), tok, [TwoTurnEnv()], cfg, max_turns=4)
    # turn 2 needs used + 3 positions > used + 2: the episode ends after turn 1, without the observation
    assert out.response_ids[0].tolist() == enc("7") + [tok.eos_token_id]
    assert out.scores.tolist() == [0.25] and out.cut_by_length.tolist() == [True]
    assert out.stats["env/cut_by_length"] == 1.0
    model.config.max_position_embeddings = used + 3  # now it fits
    monkeypatch.setattr(envs_module, "generate", _scripted_generate(tok, ["7", "42"])[0])
    out = rollout_episodes(SimpleNamespace(model=model), tok, [TwoTurnEnv()], cfg, max_turns=4)
    assert out.turns.tolist() == [2] and out.cut_by_length.tolist() == [False]
    model.config.max_position_embeddings = len(enc("1+1=")) + 2
    monkeypatch.setattr(envs_module, "generate", _scripted_generate(tok, ["7"])[0])
    with pytest.raises(ValueError, match="first prompt has 4 tokens"):
        rollout_episodes(SimpleNamespace(model=model), tok, [TwoTurnEnv()], cfg, max_turns=4)


def test_episode_is_cut_at_max_turns_without_trailing_observation(monkeypatch):
    tok = build_tokenizer()
    monkeypatch.setattr(envs_module, "generate", _scripted_generate(tok, ["7"])[0])
    out = rollout_episodes(SimpleNamespace(model=torch.nn.Linear(1, 1)), tok, [TwoTurnEnv()], RolloutConfig(),
                           max_turns=1)
    assert out.response_ids[0].tolist() == tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.scores.tolist() == [0.25] and out.turns.tolist() == [1]


# ---- a real tiny model: the trainer's logprobs on the packed episode equal those at sampling -----------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from pefrl.models import load_models, load_tokenizer

    d = save_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2)
    model_cfg = ModelConfig(name_or_path=d)
    models = load_models(model_cfg, LoraConfig(r=4), uses_critic=False)
    with torch.no_grad():  # a non-zero policy adapter, so that "policy" differs from the base
        for name, p in models.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return models, load_tokenizer(model_cfg)


def test_packed_logprobs_match_sampling(tiny_models, monkeypatch):
    from pefrl.forward import policy_forward

    models, tok = tiny_models
    turns: list[Rollout] = []

    def spy(*args, **kwargs):
        turns.append(envs_module.rollout_generate(*args, **kwargs))
        return turns[-1]

    monkeypatch.setattr(envs_module, "rollout_generate", envs_module.generate, raising=False)
    monkeypatch.setattr(envs_module, "generate", spy)
    torch.manual_seed(0)
    cfg = RolloutConfig(max_new_tokens=3, temperature=1.0)
    envs = make_envs("pefrl.tasks.games:GuessingGame", [0, 1, 2])
    out = rollout_episodes(models, tok, envs, cfg, max_turns=3)
    assert len(turns) == 3
    # the random model samples byte-level junk that text would not carry back to the same ids
    contexts = [out.query_ids[b][out.query_mask[b].bool()].tolist() + turns[0].response_ids[b].tolist()
                for b in range(3)]
    assert any(tok(envs_module._decode(tok, c), add_special_tokens=False)["input_ids"] != c for c in contexts)
    P = out.query_ids.shape[1]
    packed, _, _ = policy_forward(models, out.input_ids, out.attention_mask, P, cfg.temperature)  # (B, T)
    for b in range(3):
        actions = out.response_mask[b].nonzero().flatten().tolist()  # positions of policy tokens, in order
        sampled = []
        for turn in turns:  # every env plays all 3 turns: random guesses almost never hit the secret
            lp, _, _ = policy_forward(models, turn.input_ids, turn.attention_mask, turn.query_ids.shape[1],
                                      cfg.temperature)
            sampled += lp[b][turn.response_mask[b].bool()].tolist()
        assert torch.allclose(packed[b, actions], torch.tensor(sampled), atol=1e-5)
    # the observations are attended to: masking them out (as a plain Rollout would) changes turn 2's logprobs
    plain = torch.cat([out.query_mask, out.response_mask.long()], dim=1)
    changed, _, _ = policy_forward(models, out.input_ids, plain, P, cfg.temperature)
    assert not torch.allclose(changed * out.response_mask, packed * out.response_mask, atol=1e-4)


def test_play_rows_hands_env_reward_to_the_scorer(monkeypatch):
    from pefrl.config import EnvConfig, RewardConfig
    from pefrl.envs import env_rewards, play_rows
    from pefrl.rewards import build_scorer

    tok = build_tokenizer()
    monkeypatch.setattr(envs_module, "generate", _scripted_generate(tok, ["7", "42"])[0])
    env_cfg = EnvConfig(name="tests.test_envs:TwoTurnEnv", max_turns=4)
    rows = [{"seed": 0}, {"seed": 0}]
    texts, rollout, columns = play_rows(SimpleNamespace(model=torch.nn.Linear(1, 1)), tok, rows, RolloutConfig(),
                                        env_cfg)
    assert texts == ["1+1=", "1+1="] and columns == {"seed": [0, 0], "env_reward": [1.25, 1.25]}
    # a format rule on the transcript "7 b=42" adds to the environment's reward with its weight
    reward_cfg = RewardConfig(functions=["pefrl.tasks.format:length_target"], weights=[2.0])
    scorer = build_scorer(reward_cfg, env_rewards(env_cfg))
    scores, stats = scorer(texts, rollout.completions, {**columns, "target_length": [6, 12]})
    assert scores.tolist() == [1.25 + 2.0 * 1.0, 1.25 + 2.0 * 0.5] and stats["reward/env_reward"] == 1.25
    assert env_rewards(EnvConfig()) == []
