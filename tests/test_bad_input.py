"""Bad input gets a clear error naming what is wrong: data, prompt lengths, LoRA targets, model path, remote code.

A tokenizer without a pad token (EOS pads, with a warning; neither pad nor EOS: an error) is tested in
test_models.py::test_tokenizer_pad_fallbacks.
"""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pefrl.config import DataConfig, LoraConfig, ModelConfig
from pefrl.config_loader import load_config
from pefrl.arch import context_length
from pefrl.data import DataError, check_prompts, load_rows
from pefrl.models import load_models, load_tokenizer
from pefrl.tasks.arithmetic import DEFAULT_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR)))


# --- prompt files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("header.csv", "prompt\n"),
                                          ("zero.csv", "")])
def test_empty_prompt_file_is_an_error_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / name))} holds no rows"):
        load_rows(str(tmp_path / name))


def test_missing_prompt_file_and_missing_field_are_named(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl does not exist"):
        load_rows(str(tmp_path / "nothere.jsonl"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n{"question": "2+2="}\n')
    with pytest.raises(DataError, match=r"row 1 has no field 'prompt' \(fields: \['question'\]\)"):
        load_rows(str(tmp_path / "p.jsonl"))


# --- prompt lengths -----------------------------------------------------------------------------------------


def _rows(*texts):
    return [{"prompt": t} for t in texts]


def test_prompt_over_max_prompt_length_names_its_row(tokenizer):
    # the tiny tokenizer splits digits (as Llama does) and adds no BOS: "1+1=" is 4 tokens, each "12+" 3 more
    short, long = "1+1=", "12+" * 5 + "1="
    assert len(tokenizer(short).input_ids) == 4 and len(tokenizer(long).input_ids) == 17
    cfg = DataConfig(max_prompt_length=10, chat_template="off")
    assert check_prompts(_rows(short, short), tokenizer, cfg, 4, 64, "p.jsonl") == _rows(short, short)
    with pytest.raises(DataError, match=r"p.jsonl: row 2 has a 17-token prompt; data.max_prompt_length is 10"):
        check_prompts(_rows(short, short, long), tokenizer, cfg, 4, 64, "p.jsonl")


def test_prompt_plus_new_tokens_over_the_models_positions_names_its_row(tokenizer):
    cfg = DataConfig(max_prompt_length=256, chat_template="off")
    long = "12+" * 5 + "1="  # 17 tokens
    check_prompts(_rows(long), tokenizer, cfg, 47, 64, "src")  # 17 + 47 = 64: fits exactly
    with pytest.raises(DataError, match=r"src: row 0 has a 17-token prompt; with rollout.max_new_tokens=48 it needs "
                                        r"65 positions, the model has 64"):
        check_prompts(_rows(long), tokenizer, cfg, 48, 64, "src")


def test_online_prompts_are_checked_as_they_are_drawn(tokenizer):
    cfg = DataConfig(max_prompt_length=10, chat_template="off")
    stream = check_prompts(iter(_rows("1+1=", "2+2=", "12+" * 5 + "1=")), tokenizer, cfg, 4, None, "online")
    assert next(stream) == {"prompt": "1+1="} and next(stream) == {"prompt": "2+2="}  # lazy: no error yet
    with pytest.raises(DataError, match="online: row 2 has a 17-token prompt"):
        next(stream)


def test_context_length_reads_llama_and_gpt2_configs():
    assert context_length(SimpleNamespace(max_position_embeddings=64)) == 64
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024
    assert context_length(SimpleNamespace()) is None


def test_setup_refuses_a_too_long_prompt_before_training(tmp_path):
    from pefrl.trainer import setup

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1+1=", "2+2=", "3+" * 40 + "1="]))
    cfg = load_config(None, [f"data.prompts={data}", "data.eval_prompts=", f"output_dir={tmp_path}",
                             "reward.functions=[pefrl.tasks.arithmetic:exact_match]", "rollout.batch_size=2",
                             "rl.minibatch_size=2"])
    with pytest.raises(DataError, match=rf"{re.escape(str(data))}: row 2 has a 82-token prompt; with "
                                        r"rollout.max_new_tokens=16 it needs 98 positions, the model has 64"):
        setup(cfg)


# --- tokenizer, LoRA targets, model path, remote code -------------------------------------------------------


def test_lora_targets_that_match_nothing_list_the_modules_that_exist():
    cfg = ModelConfig(name_or_path=str(DEFAULT_MODEL_DIR))
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv_proj'\] match no linear layer of this llama; "
                                         r"linear layers it has: \['down_proj', 'gate_proj', 'k_proj', 'o_proj', "
                                         r"'q_proj', 'up_proj', 'v_proj'\]"):
        load_models(cfg, LoraConfig(r=2, target_modules=["q_proj", "qkv_proj"]), uses_critic=False)


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model-dir/"])
def test_model_path_that_does_not_exist_is_named(path):
    with pytest.raises(FileNotFoundError, match=f"model.name_or_path {re.escape(path)} does not exist"):
        load_tokenizer(ModelConfig(name_or_path=path))


def _remote_code_model(directory: Path) -> Path:
    """The tiny model with a config that names its own Python classes (auto_map), as hub repos with custom
    code do; importing that code writes a marker file."""
    directory.mkdir()
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, directory / f.name)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = "pefrl-remote-llama"
    cfg["auto_map"] = {"AutoConfig": "configuration_remote.RemoteConfig",
                       "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}
    (directory / "config.json").write_text(json.dumps(cfg))
    marker = directory / "REMOTE_CODE_RAN"
    (directory / "configuration_remote.py").write_text(
        "from transformers import LlamaConfig\n"
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "class RemoteConfig(LlamaConfig):\n    model_type = 'pefrl-remote-llama'\n")
    (directory / "modeling_remote.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_remote import RemoteConfig\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    config_class = RemoteConfig\n")
    return marker


def test_remote_code_runs_only_when_the_config_turns_it_on(tmp_path):
    from pefrl.models import load_base

    marker = _remote_code_model(tmp_path / "remote")
    assert ModelConfig().trust_remote_code is False  # the default
    with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):
        load_base(ModelConfig(name_or_path=str(tmp_path / "remote")))
    assert not marker.exists()  # refused before any of its code ran
    base = load_base(ModelConfig(name_or_path=str(tmp_path / "remote"), trust_remote_code=True))
    assert type(base).__name__ == "RemoteForCausalLM" and marker.exists()


def test_no_code_path_turns_remote_code_on_by_itself():
    for f in (REPO / "pefrl").rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", f.read_text()), f


# --- prompt sources: formats, encodings, local paths -----------------------------------------------------------


def test_a_txt_prompt_file_holds_one_prompt_a_line(tmp_path):
    (tmp_path / "p.txt").write_text("1+1=\n\n2+2=\n")
    assert load_rows(str(tmp_path / "p.txt")) == [{"prompt": "1+1="}, {"prompt": "2+2="}]
    (tmp_path / "p.tsv").write_text("1+1=\n")
    with pytest.raises(DataError, match=r"unknown format '\.tsv'; pefrl reads \.jsonl/\.json .*\.txt .*\.csv, "
                                        r"\.parquet"):
        load_rows(str(tmp_path / "p.tsv"))


@pytest.mark.parametrize("name", ["p.jsonl", "p.txt"])
def test_non_utf8_prompts_name_the_file_and_line(tmp_path, name):
    lines = [b'{"prompt": "1+1="}', b'{"prompt": "caf\xe9"}'] if name.endswith("jsonl") else [b"1+1=", b"caf\xe9"]
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / name))}:2: not UTF-8"):
        load_rows(str(tmp_path / name))


@pytest.mark.parametrize("source", ["./no/such/prompts", "/no/such/dataset_dir", "~/no-such-prompts",
                                    "no_such_prompts.txt"])
def test_a_missing_local_prompt_source_fails_at_once_naming_the_field(source):
    with pytest.raises(DataError, match=rf"data.eval_prompts {re.escape(source)} does not exist \(a local path"):
        load_rows(source, field="data.eval_prompts")


def test_offline_hub_names_fail_at_once_naming_the_field(monkeypatch):
    """A hub id that is not cached while the hub is offline: an error now, not ~25 s of the hub client's retries."""
    from huggingface_hub import constants

    from pefrl.errors import PathError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PathError, match="model.name_or_path nosuch-org/nosuch-model is not a local path, not in the "
                                        "hub cache, and the hub cannot be reached"):
        load_tokenizer(ModelConfig(name_or_path="nosuch-org/nosuch-model"))
    with pytest.raises(PathError, match="data.prompts nosuch-org/nosuch-data is not a local path"):
        load_rows("nosuch-org/nosuch-data", field="data.prompts")


def test_a_model_path_with_a_file_extension_is_local():
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path model\.safetensors does not exist"):
        load_tokenizer(ModelConfig(name_or_path="model.safetensors"))
