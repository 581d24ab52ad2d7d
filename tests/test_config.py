import dataclasses
import sys
import typing
from pathlib import Path

import pytest

from pefrl.algorithms import ALGORITHMS
from pefrl.config import Config, ConfigError
from pefrl.config_loader import load_config, reference

REPO = Path(__file__).resolve().parents[1]


def test_defaults_load():
    cfg = load_config()
    assert cfg.algo == "ppo" and cfg.rollout.num_sequences == cfg.rollout.batch_size


def test_unknown_key_names_field_and_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  clip_rnage: 0.1\n")
    with pytest.raises(ConfigError, match=r"rl\.clip_rnage.*rl\.clip_range"):
        load_config(path)


def test_unknown_section_named():
    with pytest.raises(ConfigError, match="unknown config key trian"):
        load_config(None, ["trian.steps=3"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("rl.epochs=two", "rl.epochs"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("algo=dqn", "algo"),
        ("model.critic=separate", "model.critic"),
        ("rl.kl_estimator=k4", "rl.kl_estimator"),
        ("rl.minibatch_size=5", "rl.minibatch_size"),
        ("train.lr=-1", "train.lr"),
        ("model.trust_remote_code=yes please", "model.trust_remote_code"),
        ("model.critic_layers=0", "model.critic_layers"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_critic_layers_need_a_critic_adapter():
    assert load_config(None, ["model.critic=adapter", "model.critic_layers=2"]).model.critic_layers == 2
    for overrides in (["model.critic=shared", "model.critic_layers=2"], ["model.critic_layers=2"]):  # default: shared
        with pytest.raises(ConfigError, match=r"model\.critic_layers needs model\.critic: adapter"):
            load_config(None, overrides)


def test_group_algorithms_need_samples():
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(None, ["algo=grpo"])


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr=1e-3", 'rollout.stop=["\\n"]', "reward.functions=a.b:c", "model.name_or_path="])
    assert cfg.train.lr == 1e-3 and cfg.rollout.stop == ["\n"] and cfg.reward.functions == ["a.b:c"]
    assert cfg.model.name_or_path is None


def test_shipped_configs_load():
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_reference_lists_every_field_with_a_docstring():
    table = reference()

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    for key in walk(Config):
        line = next(l for l in table.splitlines() if l.startswith(f"| `{key}` |"))
        assert not line.endswith("|  |"), f"{key} has no docstring"


def _config_sections(cls=Config):
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _config_sections(tp)


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", r"train\.lr must be a finite number, got inf"),  # used to exit 0 with nan adapters
    ("train.weight_decay=nan", r"train\.weight_decay must be a finite number, got nan"),
    ("rollout.temperature=.nan", r"rollout\.temperature must be a finite number"),
    ("rl.kl_target=-.inf", r"rl\.kl_target must be a finite number"),
])
def test_non_finite_floats_are_rejected_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_leaf_key_without_its_section_suggests_the_section():
    with pytest.raises(ConfigError, match=r"unknown config key lr; did you mean train\.lr\?"):
        load_config(None, ["lr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key rollout\.lr; did you mean train\.lr\?"):
        load_config(None, ["rollout.lr=1e-4"])


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("[]\n", "must hold a mapping of sections.*got a list"),
    ("train:\n  steps: 3\ntrain:\n  lr: 0.1\n", "line 3: key 'train' is given twice"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: key 'lr' is given twice"),
    ("train:\n  steps: [3\n", "not valid YAML"),
])
def test_bad_yaml_files_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {path}.*{message}"):
        load_config(path)


def test_non_utf8_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  steps: 3\noutput_dir: runs/caf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"{path}:3: not UTF-8"):
        load_config(path)


def test_output_dir_empty_is_rejected_and_home_is_expanded():
    with pytest.raises(ConfigError, match="output_dir must not be empty"):
        load_config(None, ["output_dir="])
    with pytest.raises(ConfigError, match="output_dir must not be empty"):
        load_config(None, ['output_dir=""'])
    assert load_config(None, ["output_dir=~/runs/x"]).output_dir == str(Path.home() / "runs" / "x")


def test_the_loader_is_not_imported_by_the_schema():
    """Arrows point down: config_loader imports config; config must load without it (no cycle)."""
    import subprocess
    import sys

    code = "import sys, pefrl.config; assert 'pefrl.config_loader' not in sys.modules and 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow  # 9 one-step runs (about 40 s on 2 cores)
def test_every_config_field_is_read_somewhere(tmp_path, monkeypatch):
    """A field nothing reads is a lie to the user (TRL has several). Every section records the fields read on it
    from outside config.py (a derived property, e.g. rl.micro_batch_size, reads on its caller's behalf; saving
    or validating the config does not count) while one step of every algorithm, an environment run and a
    reward-model run with a checkpoint train, and while a 4-bit base loads."""
    from pefrl.data import load_rows
    from pefrl.models import load_base
    from pefrl.trainer import train

    monkeypatch.chdir(REPO)
    # the schema and its loader read fields generically (validating, saving): that proves nothing
    config_files = {str(REPO / "pefrl" / f) for f in ("config.py", "config_sections.py", "config_loader.py")}
    skip = ("__post_init__", "to_dict", "asdict", "_asdict_inner")
    properties = {name for cls in _config_sections() for name, v in vars(cls).items() if isinstance(v, property)}
    reads = set()
    for cls in set(_config_sections()):
        fields = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _cls=cls, _fields=fields, _get=cls.__getattribute__):
            caller = sys._getframe(1).f_code
            inside = caller.co_filename in config_files and caller.co_name not in properties
            if name in _fields and not inside and caller.co_name not in skip and "copy" not in caller.co_filename:
                reads.add(f"{_cls.__name__}.{name}")
            return _get(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    small = ["train.steps=1", "rollout.batch_size=4", "data.eval_size=4"]
    runs = [(f"arithmetic_{algo}", [f"rl.minibatch_size={4 * (1 + (algo == 'grpo'))}"]) for algo in sorted(ALGORITHMS)]
    sampled_eval = ["eval.num_samples=2", "eval.temperature=0.7", "train.eval_every=1", "train.keep_best=eval_pass@2"]
    runs += [("arithmetic_dapo", ["rl.minibatch_size=4", "rl.overlong_buffer_len=2"]),  # the soft overlong penalty
             ("guessing_game", ["rl.minibatch_size=16"]),
             ("reward_model", ["rl.minibatch_size=4", "train.save_every=1", *sampled_eval])]
    for i, (name, extra) in enumerate(runs):
        train(load_config(REPO / "recipes" / "configs" / f"{name}.yaml", [f"output_dir={tmp_path / str(i)}", *small, *extra]))
    # a fresh run into the first run's directory: train.overwrite is read only where output_dir holds a run
    train(load_config(REPO / "recipes" / "configs" / f"{runs[0][0]}.yaml",
                      [f"output_dir={tmp_path / '0'}", "train.overwrite=true", *small, *runs[0][1]]))
    load_base(load_config(None, ["model.quantization=4bit"]).model)  # the embedded model, quantized via the cache
    # data.split is read where prompts come from a `datasets` source (a CSV here), which no recipe above uses
    (tmp_path / "prompts.csv").write_text("prompt\n1+1=\n")
    load_rows(str(tmp_path / "prompts.csv"), load_config(None, []).data)
    every = {f"{cls.__name__}.{f.name}" for cls in _config_sections() for f in dataclasses.fields(cls)}
    assert not sorted(every - reads), f"config fields never read outside config.py: {sorted(every - reads)}"
