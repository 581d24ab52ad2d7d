"""A 4-bit base from an unquantized local safetensors checkpoint, quantized once, tensor by tensor, into a cached
checkpoint that transformers then loads as pre-quantized (model.prequantize).

Why: quantizing on load, transformers keeps the whole source file mapped while it quantizes, so loading peaks at
the file plus the quantized base (docs/benchmarks.md, "1B-class bases": over 3x the peak of loading the same base
pre-quantized). Here each tensor is read into a fresh buffer with os.preadv (the file stays in the page cache,
not in this process), quantized as transformers' `Bnb4bitQuantize` does it (the same skeleton,
`modules_to_not_convert`, dtype cast and `Params4bit`), and saved in the layout transformers saves for a 4-bit
model (packed weight + absmax / quant_map / nested_* / quant_state.bitsandbytes__<type>), in shards of
SHARD_BYTES. An entry is written under a temporary name, its marker last, then renamed into place:
a killed write is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from pefrl.hub import MARKER, cache_root, read_marker

logger = logging.getLogger(__name__)

SHARD_BYTES = 256 * 2**20
"""Output is held in memory one shard at a time; save_file copies a shard once more while writing it."""
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def cache_dir() -> Path:
    """Where the 4-bit checkpoints go: <pefrl cache root>/quantized ($PEFRL_CACHE, else ~/.cache/pefrl)."""
    return cache_root() / "quantized"


def prequantized_checkpoint(source: str, quant: BitsAndBytesConfig, dtype: torch.dtype,
                            device: torch.device) -> Path | None:
    """The cached 4-bit checkpoint of the local checkpoint `source`, written first if missing; None where this
    path does not apply (not a local directory of unquantized safetensors, not 4-bit, or keys that transformers
    would rename on load): the caller then quantizes on load as before."""
    files = checkpoint_files(Path(source))
    if not quant.load_in_4bit or files is None:
        return None
    config = AutoConfig.from_pretrained(source)
    if getattr(config, "quantization_config", None) is not None:
        return None  # already quantized: transformers loads it as it is
    key = _cache_key(Path(source), files, quant, dtype, device)
    out = cache_dir() / f"{Path(source).resolve().name}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"
    if read_marker(out) is not None:
        logger.info("4-bit base of %s: reusing %s (%.0f MiB)", source, out, _size(out) / 2**20)
        return out
    skeleton = _quantized_skeleton(config, quant, dtype)
    names = skeleton.state_dict().keys()
    entries = [(name, e["dtype"]) for f in files for name, e in read_header(Path(source) / f)[0].items()]
    if any(name not in names or kind not in SAFETENSORS_DTYPES for name, kind in entries):
        return None  # keys transformers renames on load (older names) or a dtype not read here: its own path
    t0 = time.perf_counter()
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache_dir()))
    try:
        _write(Path(source), files, skeleton, config, quant, dtype, device, tmp)
        (tmp / MARKER).write_text(json.dumps(key | {"seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
        if out.exists() and read_marker(out) is None:
            shutil.rmtree(out)  # left by something else than this function, which renames complete entries only
        try:
            tmp.rename(out)
        except OSError:  # another process (a second rank) put the same entry in place first
            if read_marker(out) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("4-bit base of %s: wrote %s (%.0f MiB, %.0f s)", source, out, _size(out) / 2**20,
                time.perf_counter() - t0)
    return out


# --- the source checkpoint ----------------------------------------------------------------------------------


def checkpoint_files(source: Path) -> list[str] | None:
    """The safetensors files of a local checkpoint directory (one file, or the shards its index names; the one
    file first, as transformers looks), or None when it has neither."""
    if (source / SINGLE).is_file():
        return [SINGLE]
    if (source / INDEX).is_file():
        return sorted(set(json.loads((source / INDEX).read_text())["weight_map"].values()))
    return None


def _cache_key(source: Path, files: list[str], quant: BitsAndBytesConfig, dtype: torch.dtype,
               device: torch.device) -> dict:
    """What the entry depends on: the source's files (size, mtime), the quantization, the versions that write it."""
    import bitsandbytes
    import transformers

    stats = {}
    for f in ("config.json", INDEX, *files):
        if (source / f).is_file():
            st = (source / f).stat()
            stats[f] = [st.st_size, st.st_mtime_ns]
    return {"source": str(source.resolve()), "files": stats, "quant_type": quant.bnb_4bit_quant_type,
            "double_quant": quant.bnb_4bit_use_double_quant, "compute_dtype": str(quant.bnb_4bit_compute_dtype),
            "dtype": str(dtype), "device": device.type, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries {name: {dtype, shape, data_offsets}} and where its data starts:
    an 8-byte little-endian header length, then that many bytes of JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensors(path: Path):
    """Yield (name, tensor) for each tensor of a safetensors file, in file order, each read into its own buffer:
    nothing of the file stays mapped in this process."""
    header, start = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            view, done = memoryview(buf.numpy()), 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                n = os.preadv(fd, [view[done:]], start + begin + done)
                if n <= 0:
                    raise OSError(f"{path}: tensor {name} is cut short")
                done += n
            yield name, buf.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    finally:
        os.close(fd)


# --- quantizing as transformers does on load ----------------------------------------------------------------


def _quantized_skeleton(config, quant: BitsAndBytesConfig, dtype: torch.dtype):
    """The model on the meta device with transformers' own bitsandbytes layers in place: the same
    modules_to_not_convert (tied / output embeddings, the last module, llm_int8_skip_modules) as on load."""
    from transformers.modeling_utils import local_torch_dtype
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
    # from_pretrained builds the model and swaps its layers under the load dtype as torch's default dtype: the
    # new Linear4bit biases take it (and are saved in it)
    with torch.device("meta"), local_torch_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"})
    model.hf_quantizer = quantizer
    return model


def _quantize(skeleton, name: str, tensor: torch.Tensor, dtype: torch.dtype,
              device: torch.device) -> dict[str, torch.Tensor]:
    """`name`'s entries in the saved 4-bit checkpoint: transformers' loader casts every tensor it quantizes to the
    load dtype and every other one to its parameter's dtype (core_model_loading), then Bnb4bitQuantize wraps the
    weight in a Params4bit with the skeleton's settings and moves it to the device, which quantizes it;
    Linear4bit._save_to_state_dict saves the packed weight and quant_state.as_dict(packed=True)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import get_module_from_name

    empty = skeleton.get_parameter_or_buffer(name)
    if not skeleton.hf_quantizer.param_needs_quantization(skeleton, name):
        return {name: tensor.to(empty.dtype)}
    value = tensor.to(device=device, dtype=dtype)
    module, _ = get_module_from_name(skeleton, name)
    if issubclass(module.source_cls, Conv1D):  # stored transposed (GPT-2), as Bnb4bitQuantize turns it
        value = value.T
    # module=None: the meta module need not keep each quant_state alive (it changes nothing in the result)
    weight = bnb.nn.Params4bit(value, requires_grad=False, **(empty.__dict__ | {"module": None})).to(value.device)
    entries = {name: weight.data} | {f"{name}.{k}": v for k, v in weight.quant_state.as_dict(packed=True).items()}
    return {k: v.cpu() for k, v in entries.items()}


def _write(source: Path, files: list[str], skeleton, config, quant: BitsAndBytesConfig, dtype: torch.dtype,
           device: torch.device, out: Path) -> None:
    """Quantize the source tensor by tensor into shards of ~SHARD_BYTES under `out`, with an index, the config
    (carrying quantization_config, as save_pretrained writes it) and the generation config."""
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        nonlocal total
        if shard:
            fname = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            total += sum(t.nbytes for t in shard.values())
            shard.clear()

    for f in files:
        for name, tensor in _read_tensors(source / f):
            shard |= _quantize(skeleton, name, tensor, dtype, device)
            if sum(t.nbytes for t in shard.values()) >= SHARD_BYTES:
                flush()
    flush()
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.quantization_config = quant
    config.dtype = dtype
    config.save_pretrained(out)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())
