"""`pefrl init [DIR]`: write a starter config.yaml and a documented reward file my_reward.py into DIR.

The starter runs as written on the embedded tiny model (two-digit addition), so `cd DIR && pefrl train
config.yaml` works before anything is edited; its comments say what to change for a real model and task.
Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_NAME = "config.yaml"
REWARD_NAME = "my_reward.py"

STARTER_CONFIG = """\
# pefrl starter config. Run it from this directory:  pefrl train config.yaml
# Any key can be overridden on the command line:     pefrl train config.yaml train.steps=10 rollout.temperature=0.8
# Every key, its type, default and meaning: the config reference in pefrl's README.
algo: ppo                 # ppo, a2c, reinforce, rloo, grpo, reinforce_pp or trpo
output_dir: runs/my_run   # metrics.jsonl, config.yaml, summary.json and final/ (the adapters) go here

model:
  # Empty: the embedded tiny arithmetic model (runs on a CPU in minutes). For a real run pick a small
  # instruct model, e.g. Qwen/Qwen2.5-0.5B-Instruct or HuggingFaceTB/SmolLM2-135M-Instruct.
  name_or_path: null
  dtype: float32          # bfloat16 on a GPU
  quantization: null      # '4bit' for QLoRA-style training of a base that does not fit in memory

lora:
  r: 16
  alpha: 32

data:
  # A JSONL/CSV/Parquet file, a `datasets` name or a load_from_disk directory. The prompt is in column
  # `prompt_field` (a string or a list of {role, content} messages), or built from columns by
  # prompt_template: "Question: {question}"; every other column (here `answer`) reaches the reward by name.
  prompts: builtin:arithmetic
  prompt_field: prompt
  eval_prompts: auto      # auto: a builtin's own eval set, else none; or a file; null: no evaluation
  # eval_holdout: 64      # or hold out 64 rows of `prompts` for evaluation (never trained on)
  # system_prompt: "You are a careful calculator."   # with a chat template
  eval_size: 200

rollout:
  batch_size: 32          # prompts per step
  num_samples: 1          # completions per prompt; rloo and grpo need >= 2
  max_new_tokens: 6       # raise for real tasks (e.g. 256 for math with reasoning)
  temperature: 1.0

reward:
  # 'file.py:function' (a path relative to where you run pefrl) or 'package.module:function'.
  functions: [my_reward.py:reward]
  # model: path/to/reward-model   # a sequence-classification checkpoint, added to the functions' sum

rl:
  epochs: 2
  # minibatch_size: 16    # empty: the whole rollout; else it must divide batch_size * num_samples
  kl_coef: 0.05           # pull towards the reference (the base with adapters off)

train:
  steps: 50
  lr: 5.0e-4              # learns this starter task in 50 steps (3e-3 collapses); 1e-5 to 1e-4 for real models
  eval_every: 10
  save_every: 0           # checkpoints every N steps (0: only final/)
"""

STARTER_REWARD = '''\
"""Reward functions for pefrl: named in config.yaml as `reward.functions: [my_reward.py:reward]`.

A reward function receives the batch's prompts, the policy's completions (the generated text only, without the
prompt) and every extra column of the prompt data by name, one entry per completion, and returns one float per
completion. Higher is better. Several functions are summed with `reward.weights`.

Rules of thumb:
- Keep it cheap: it runs on every step's whole batch.
- Return finite numbers only: NaN or inf stops the run naming the sample.
- A function that raises is re-run sample by sample so the error names the sample that fails;
  `reward.on_error: skip` scores such samples 0 instead.
- Accept **columns so that data with more columns than you use still works.
"""

from __future__ import annotations


def reward(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where the completion (whitespace stripped) equals the row's `answer` column, else 0.0.

    Example: prompts ["2+3=", "9+9="], completions ["5", "17"], answer ["5", "18"] -> [1.0, 0.0].
    """
    return [1.0 if completion.strip() == str(ans).strip() else 0.0 for completion, ans in zip(completions, answer)]


def brevity(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """A second example that needs no data column: -0.01 per character, to prefer short answers.

    Use both with `functions: [my_reward.py:reward, my_reward.py:brevity]` and `weights: [1.0, 0.5]`.
    """
    return [-0.01 * len(completion) for completion in completions]
'''


def write_starter(directory: str | Path) -> list[Path]:
    """Write config.yaml and my_reward.py into `directory` (created if needed); raise if either exists."""
    directory = Path(directory)
    files = {directory / CONFIG_NAME: STARTER_CONFIG, directory / REWARD_NAME: STARTER_REWARD}
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; pick another directory or move them")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return list(files)


def run(args: argparse.Namespace) -> int:
    try:
        written = write_starter(args.dir)
    except FileExistsError as e:
        print(f"pefrl init: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    where = "" if Path(args.dir) == Path(".") else f"cd {args.dir} && "
    print(f"next: {where}pefrl train {CONFIG_NAME} train.steps=5   # a quick first run on the embedded model")
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="write a starter config.yaml and my_reward.py",
                       description="Write a commented starter config.yaml and a documented reward file "
                                   "my_reward.py into DIR (default: the current directory). Never overwrites.")
    p.add_argument("dir", nargs="?", default=".", help="directory to write into (created if needed)")
    p.set_defaults(func=run)
