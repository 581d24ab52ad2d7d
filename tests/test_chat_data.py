"""A user's own data (issue #13): defaults follow it (no builtin eval set on it, held-out rows of it, sizes that
follow rollout.batch_size), and TRL's dataset conventions: a prompt is a string or a list of {role, content}
messages, or data.prompt_template builds it from columns; the chat template gets data.system_prompt and
data.chat_template_kwargs; reward functions get prompts as given and completions as strings; samples.jsonl
records what the model saw. Run from a directory other than the repo, through the CLI and the Python API."""

import json
import shutil
from contextlib import chdir
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import pefrl
from pefrl.cli import main
from pefrl.config import ConfigError, DataConfig
from pefrl.config_loader import load_config
from pefrl.data import DataError, format_prompt, format_turn, hold_out, load_rows, row_prompt
from pefrl.tiny import default_model_dir

# A small Jinja chat template: roles in angle brackets, a marker when thinking is switched off.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>"
            "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}{% endif %}")
SMOLLM2 = Path("~/.cache/pefrl/SmolLM2-135M-Instruct").expanduser()
REWARD = ("SEEN = []\n"
          "def exact(prompts, completions, answer, **columns):\n"
          "    assert all(isinstance(c, str) for c in completions)\n"
          "    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]\n")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The embedded tiny model with a chat template on its tokenizer."""
    out = tmp_path_factory.mktemp("chat-model")
    shutil.copytree(default_model_dir(), out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tok(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


def _rows(n: int = 24) -> list[dict]:
    """question/answer pairs plus a chat-messages `prompt` column, as a user's jsonl holds them."""
    return [{"question": f"{a}+{b}=", "answer": str(a + b), "prompt": [{"role": "user", "content": f"{a}+{b}="}]}
            for a, b in zip(range(10, 10 + n), range(40, 40 + n))]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (tmp_path / "mine.py").write_text(REWARD)
    return tmp_path


# --- 1. defaults follow the user's data ----------------------------------------------------------------------


def test_own_data_trains_without_the_builtin_eval_set(project, chat_model):
    """Before: eval before training scored the builtin arithmetic rows with the user's reward, which read their
    missing `answer` column (RewardError: 'NoneType' object is not subscriptable). Also: rollout.batch_size 8
    alone, with rl.minibatch_size left unset, was refused."""
    with chdir(project):
        assert main(["train", f"model.name_or_path={chat_model}", "data.prompts=data.jsonl",
                     "reward.functions=[mine.py:exact]", "rollout.batch_size=8", "rollout.max_new_tokens=3",
                     "train.steps=1", "output_dir=run"]) == 0
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert "eval_before" not in summary and summary["steps"] == 1


def test_size_and_eval_defaults():
    cfg = load_config(None, ["rollout.batch_size=8"])
    assert cfg.rl.minibatch_size is None and (cfg.minibatch_size, cfg.micro_batch_size) == (8, 8)
    assert cfg.data.eval_source == "builtin:arithmetic-eval"  # a builtin brings its own eval set
    assert load_config(None, ["data.prompts=my.jsonl"]).data.eval_source is None
    assert load_config(None, ["data.eval_prompts="]).data.eval_source is None
    assert load_config(None, ["rollout.batch_size=8", "rollout.num_samples=4", "rl.grad_accum_steps=4"]
                       ).micro_batch_size == 8
    with pytest.raises(ConfigError, match=r"rl.minibatch_size \(16\) must divide .* \(8\)"):
        load_config(None, ["rollout.batch_size=8", "rl.minibatch_size=16"])  # an explicit value is still checked
    with pytest.raises(ConfigError, match=r"the rollout \(rl.minibatch_size empty\) \(6\) must be divisible"):
        load_config(None, ["rollout.batch_size=6", "rl.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match="both name the evaluation rows"):
        load_config(None, ["data.eval_holdout=4", "data.eval_prompts=eval.jsonl"])
    with pytest.raises(ConfigError, match="environment run reads none"):
        load_config(None, ["data.eval_holdout=4", "env.name=pefrl.tasks.games:GuessingGame"])


def test_hold_out_is_seeded_disjoint_and_refuses_what_it_cannot_hold():
    rows = [{"prompt": str(i)} for i in range(20)]
    train, held = hold_out(rows, 5, seed=3, source="src")
    assert len(held) == 5 and len(train) == 15 and not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert hold_out(rows, 5, seed=3, source="src") == (train, held)
    assert hold_out(rows, 5, seed=4, source="src")[1] != held
    with pytest.raises(DataError, match=r"eval_holdout \(20\) must be below the number of rows of src \(20\)"):
        hold_out(rows, 20, seed=0, source="src")
    with pytest.raises(DataError, match="online iterable"):
        hold_out(iter(rows), 5, seed=0, source="prompt_source")


def test_eval_holdout_evaluates_on_held_out_rows_never_trained_on(project, chat_model):
    """CLI: data.eval_holdout evaluates before and after on the user's own rows; `pefrl eval` finds the same
    rows again; samples.jsonl shows prompts after the chat template (system prompt included)."""
    seen = []
    with chdir(project):
        assert main(["train", f"model.name_or_path={chat_model}", "data.prompts=data.jsonl",
                     "data.eval_holdout=8", "data.system_prompt=Add.", "reward.functions=[mine.py:exact]",
                     "rollout.batch_size=8", "rollout.max_new_tokens=3", "train.steps=2", "train.samples_every=1",
                     "output_dir=run"]) == 0
        cfg = load_config("run/config.yaml")
        result = pefrl.evaluate("run")
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert "eval_before" in summary and "eval_after" in summary
    assert result["n"] == 8 and result["data"].endswith("(held out)")
    held = {r["question"] for r in hold_out(load_rows(cfg.data.prompts, cfg.data), 8, 0, "x")[1]}
    samples = [json.loads(l) for l in (project / "run" / "samples.jsonl").read_text().splitlines()]
    for s in samples:
        assert s["prompt"].startswith("<system>Add.\n<user>") and s["prompt"].endswith("\n<assistant>")
        seen.append(s["prompt"].split("<user>")[1].split("\n")[0])
    assert seen and not set(seen) & held  # trained prompts are never held-out ones


# --- 2. conversational data ----------------------------------------------------------------------------------


def test_python_api_chat_rows_reach_rewards_as_given(tmp_path, chat_model):
    """pefrl.train(prompts=rows) with chat messages: trained on the template's text, not the list's repr; the
    reward gets the messages as given and completions as strings."""
    got = []

    def exact(prompts, completions, answer, **_):
        got.extend(zip(prompts, completions))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    with chdir(tmp_path):
        cfg = pefrl.load_config({"model": {"name_or_path": str(chat_model)}, "output_dir": "run",
                                 "data": {"chat_template_kwargs": {"enable_thinking": False}, "eval_prompts": None},
                                 "rollout": {"batch_size": 8, "max_new_tokens": 3}, "train": {"steps": 1,
                                                                                              "samples_every": 1}})
        pefrl.train(cfg, rewards=[exact], prompts=_rows())
    assert got and all(isinstance(p, list) and p[0]["role"] == "user" and isinstance(c, str) for p, c in got)
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<user>") and sample["prompt"].endswith("<assistant>[no-think]")


def test_python_api_checks_online_rows_as_drawn(tmp_path, chat_model):
    rows = iter([*_rows(3), {"prompt": {"role": "user", "content": "1+1="}, "answer": "2"}])
    cfg = pefrl.load_config({"model": {"name_or_path": str(chat_model)}, "output_dir": str(tmp_path / "run"),
                             "data": {"eval_prompts": None}, "rollout": {"batch_size": 4, "max_new_tokens": 2},
                             "train": {"steps": 1}})
    with pytest.raises(DataError, match=r"prompt_source: row 3: field 'prompt' must hold a string or a list of "
                                        r"\{role, content\} messages; got a dict"):
        pefrl.train(cfg, rewards=[lambda prompts, completions, **_: [0.0] * len(prompts)], prompts=rows)


@pytest.mark.parametrize("prompt,problem", [
    ({"role": "user", "content": "hi"}, "got a dict"),
    (7, "got a int"),
    (["hi", "there"], "message 0 is a str"),
    ([{"role": "user"}], "message 0 needs a string 'role' and a string 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}], "message 1 has role 'narrator'"),
    ([], "got an empty list"),
])
def test_a_prompt_of_any_other_shape_names_row_and_field(tmp_path, prompt, problem):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(DataError, match=rf"p\.jsonl: row 1: field 'prompt' must hold .*; {problem}"):
        load_rows(str(path))


def test_prompt_template_builds_prompts_from_columns(tmp_path, tok):
    data = DataConfig(prompt_template="Question: {question}")
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "2+2=", "answer": "4"}\n{"q": "3+3=", "answer": "6"}\n')
    with pytest.raises(DataError, match=r"row 1 has no column 'question', which data.prompt_template"):
        load_rows(str(path), data)
    assert row_prompt({"question": "2+2="}, data, "row 0") == "Question: 2+2="
    assert format_prompt(tok, "Question: 2+2=", data) == "<user>Question: 2+2=\n<assistant>"
    with pytest.raises(ConfigError, match="not a format string"):
        DataConfig(prompt_template="Question: {question")


def test_system_prompt_and_template_kwargs_reach_the_text(tok):
    data = DataConfig(system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    assert format_prompt(tok, "2+2=", data) == "<system>Be brief.\n<user>2+2=\n<assistant>[no-think]"
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "2+2="}]
    assert format_prompt(tok, own, data) == "<system>Mine.\n<user>2+2=\n<assistant>[no-think]"  # the row's own
    assert format_prompt(tok, "2+2=", DataConfig(chat_template="off")) == "2+2="
    with pytest.raises(DataError, match="chat messages needs a chat template, but data.chat_template is 'off'"):
        format_prompt(tok, own, DataConfig(chat_template="off"))
    tok.chat_template = None
    with pytest.raises(DataError, match="data.system_prompt needs a chat template, but the tokenizer has no chat template"):
        format_prompt(tok, "2+2=", data)
    with pytest.raises(ConfigError, match="data.system_prompt needs a chat template"):
        load_config(None, ["data.chat_template=off", "data.system_prompt=x"])
    assert load_config(None, ["data.chat_template_kwargs={enable_thinking: false}"]
                       ).data.chat_template_kwargs == {"enable_thinking": False}


def test_environment_turns_go_through_the_template(tok):
    data = DataConfig(system_prompt="Play.")
    assert format_turn(tok, " higher=", data) == "\n<user> higher=\n<assistant>"
    assert format_turn(tok, " higher=", DataConfig(chat_template="off")) == " higher="


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="SmolLM2-135M-Instruct not prepared")
def test_smollm2_template_gets_system_prompt_and_turns():
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    text = format_prompt(tok, [{"role": "user", "content": "2+2="}], DataConfig(system_prompt="Be brief."))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # a turn that ended in <|im_end|> (SmolLM2's EOS) is not closed twice
    assert format_turn(tok, "higher", DataConfig(), after="<|im_end|>") == (
        "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n")
