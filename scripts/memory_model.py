"""Bytes of an RL fine-tuning step, by formula: base, adapters, optimizer, KV cache, activations, logits.

    python scripts/memory_model.py                 # the table in docs/memory.md
    python scripts/memory_model.py --check         # predicted vs measured (docs/benchmarks.md numbers)

Pure Python (no torch): every number is a count of parameters or elements times bytes per element. The shapes
are the published configs of each model; the GPU table asks what fits for pefrl (one base: policy, critic and
reference as adapters) and for TRL (PPO: policy + reference + full value model + reward model; GRPO: one base
with a peft policy, the reference = adapters disabled). Formulas and their sources: docs/memory.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape, as in its Hugging Face config.json."""

    arch: str  # "llama" | "qwen2": Qwen2 has biases on q/k/v
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven projections of one decoder layer: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's projections (what 4-bit / 8-bit quantization applies to)."""
        return sum(a * b for a, b in self.linear_shapes())

    @property
    def layer_other_params(self) -> int:
        """Two RMSNorms, plus Qwen2's q/k/v biases."""
        return 2 * self.hidden + (self.hidden + 2 * self.kv_dim if self.arch == "qwen2" else 0)

    @property
    def embed_params(self) -> int:
        """Input embedding, plus lm_head when it is not tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        """All parameters, as `sum(p.numel() for p in model.parameters())` counts them (tied counted once)."""
        return self.layers * (self.layer_linear_params + self.layer_other_params) + self.embed_params + self.hidden


# Published configs (config.json on the hub), written by hand: no download needed.
SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151936, True, 1000000.0),
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, True, 500000.0),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1000000.0),
    "llama-3.1-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256, False, 500000.0),
    "llama-3.1-70b": Shape("llama", 8192, 80, 64, 8, 28672, 128256, False, 500000.0),
}
SHAPES["smollm2-135m"] = Shape("llama", 576, 30, 9, 3, 1536, 49152, True, 100000.0)  # checked by --check only

# bytes per weight of a quantized projection. 4-bit (bitsandbytes nf4/fp4): 4 bits + one absmax per 64-weight
# block, stored as 1 byte with double quantization (plus an fp32 constant per 256 blocks), else fp32.
# 8-bit (LLM.int8): 1 byte + an fp32 scale per output row (counted per weight at the layer's shape below).
QUANT_BYTES = {"bf16": 2.0, "fp32": 4.0, "8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "4bit-nodq": 0.5 + 4 / 64}


def base_bytes(s: Shape, quant: str = "bf16", other_bytes: float | None = None) -> float:
    """Weights of the frozen base. quant: bf16 | fp32 | 8bit | 4bit | 4bit-nodq. `other_bytes`: bytes per
    non-quantized parameter (embeddings, norms, biases); quantized bases keep them in fp32 by default, as
    peft's prepare_model_for_kbit_training (QLoRA) upcasts them."""
    linear = s.layers * s.layer_linear_params
    other = s.params - linear
    if other_bytes is None:
        other_bytes = QUANT_BYTES[quant] if quant in ("bf16", "fp32") else 4.0
    scales = 4 * s.layers * sum(out for _, out in s.linear_shapes()) if quant == "8bit" else 0
    return linear * QUANT_BYTES[quant] + scales + other * other_bytes


def fsdp_rank_base_bytes(s: Shape, world: int, elem: float = 2.0, gathered_layers: int = 3) -> float:
    """Base weights one rank holds under pefrl's FSDP2 (pefrl/fsdp.py): 1/world of every decoder layer, the
    embeddings, final norm (and an untied lm_head) replicated, plus `gathered_layers` whole layers' worth while
    a layer runs (reshard_after_forward frees each after its forward; backward gathers it again). 3, measured
    (scripts/fsdp_layers_held.py, gloo on CPU): a layer's all-gather output and the parameters copied out of it,
    and one more layer's worth live at the same time, in the forward and the backward alike. An unsharded base
    (world 1) is base_bytes. elem: bytes per weight (bf16: 2)."""
    if world == 1:
        return elem * s.params
    layer = s.layer_linear_params + s.layer_other_params
    replicated = s.embed_params + s.hidden  # + the final norm
    return elem * (replicated + s.layers * layer / world + gathered_layers * layer)


def lora_params(s: Shape, r: int = 16) -> int:
    """One LoRA adapter of rank r on all seven projections of every layer: A (r x in) + B (out x r)."""
    return s.layers * sum(r * (a + b) for a, b in s.linear_shapes())


def trainable_bytes(n_params: int) -> int:
    """fp32 weights + fp32 gradients + AdamW's two fp32 moments: 16 bytes per trainable parameter."""
    return 16 * n_params


def kv_cache_bytes(s: Shape, batch: int, seq_len: int, elem: int = 2) -> int:
    """Keys and values of every layer for batch x seq_len tokens (GQA: kv_heads x head_dim each)."""
    return 2 * s.layers * s.kv_dim * batch * seq_len * elem


def activation_bytes(s: Shape, batch: int, seq_len: int, elem: int = 2, checkpointing: bool = False,
                     lora_r: int | None = 16) -> int:
    """Tensors a decoder stack keeps for backward through a frozen base (SDPA attention, no dropout). A frozen
    projection keeps only its weight (already counted), so what is kept is per token and layer: with LoRA of
    rank r on all seven projections 6h + 2kv + 4i + 7r elements, without adapters 4.5h + 2kv + 3i (norm inputs
    and outputs, rotary q/k, v, attention output, the SwiGLU gate/up/product, each adapter's input and its
    r-wide middle). Counted with torch.autograd.graph.saved_tensors_hooks on tiny Llamas by varying h, kv, i,
    r and T one at a time (docs/memory.md). Checkpointing keeps one input per layer (h) plus one layer's set
    during its recompute."""
    if lora_r is None:
        per_layer = 4.5 * s.hidden + 2 * s.kv_dim + 3 * s.intermediate
    else:
        per_layer = 6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate + 7 * lora_r
    tokens = batch * seq_len
    if checkpointing:
        return int(elem * tokens * (s.layers * s.hidden + per_layer))
    return int(elem * tokens * s.layers * per_layer)


def logits_bytes(s: Shape, batch: int, seq_len: int, chunk: int | None = None) -> int:
    """fp32 (B, T, V) logits, their log-softmax and its gradient: 3 copies; with chunking only `chunk`
    positions at a time (pefrl model.logits_chunk_size)."""
    return 3 * 4 * batch * min(seq_len, chunk or seq_len) * s.vocab


@dataclass(frozen=True)
class Workload:
    """The step the table is sized for: generation of gen_batch sequences of seq_len tokens (KV cache), then
    an update over micro-batches of micro_batch sequences."""

    gen_batch: int = 16
    seq_len: int = 1024
    micro_batch: int = 4
    lora_r: int = 16
    logits_chunk: int = 256
    elem: int = 2  # bytes of an activation / KV element (bf16)


def parts(s: Shape, quant: str, w: Workload, checkpointing: bool = True, chunked: bool = True) -> dict[str, float]:
    """Every term of one pefrl step's peak, in bytes."""
    return {
        "base": base_bytes(s, quant),
        "adapters+optim": trainable_bytes(2 * lora_params(s, w.lora_r) + s.hidden + 1),  # policy + critic + head
        "kv_cache": kv_cache_bytes(s, w.gen_batch, w.seq_len, w.elem),
        "activations": activation_bytes(s, w.micro_batch, w.seq_len, w.elem, checkpointing, w.lora_r),
        "logits": logits_bytes(s, w.micro_batch, w.seq_len, w.logits_chunk if chunked else None),
    }


def pefrl_bytes(s: Shape, quant: str, w: Workload, checkpointing: bool = True, chunked: bool = True,
                critic: bool = True) -> float:
    """One base serves policy, critic (adapter + value head) and reference (adapters off): the base, the
    trainable state, and the larger of generation (KV cache) and one update pass (activations + logits; the
    critic's backward runs before the policy's forward, so their graphs never coexist)."""
    p = parts(s, quant, w, checkpointing, chunked)
    trainable = p["adapters+optim"] if critic else trainable_bytes(lora_params(s, w.lora_r))
    return p["base"] + trainable + max(p["kv_cache"], p["activations"] + p["logits"])


def trl_ppo_bytes(s: Shape, quant: str, w: Workload, checkpointing: bool = True, value_bytes: int = 16) -> float:
    """TRL's PPOTrainer with peft: the policy base (reference = adapter off) + its adapter, a full value model
    trained with AdamW (`value_bytes` per parameter: 16 = fp32 weights, grads, two moments; 8 when loaded
    bf16) and a frozen reward model in the base's format. Its logits are never chunked."""
    return (base_bytes(s, quant) + trainable_bytes(lora_params(s, w.lora_r)) + value_bytes * s.params
            + base_bytes(s, quant) + max(kv_cache_bytes(s, w.gen_batch, w.seq_len, w.elem),
                                         2 * activation_bytes(s, w.micro_batch, w.seq_len, w.elem, checkpointing)
                                         + logits_bytes(s, w.micro_batch, w.seq_len)))


def trl_grpo_bytes(s: Shape, quant: str, w: Workload, checkpointing: bool = True) -> float:
    """TRL's GRPOTrainer with peft: one base, one adapter, reference = adapter disabled, dense logits."""
    return (base_bytes(s, quant) + trainable_bytes(lora_params(s, w.lora_r))
            + max(kv_cache_bytes(s, w.gen_batch, w.seq_len, w.elem),
                  activation_bytes(s, w.micro_batch, w.seq_len, w.elem, checkpointing)
                  + logits_bytes(s, w.micro_batch, w.seq_len)))


# (name, GPUs, GiB each). Sharded: FSDP / ZeRO-3 splits the base and trainable state over the GPUs; the
# per-GPU step terms (KV cache, activations, logits) are not split. 2 GiB per GPU is kept for the CUDA context.
GPUS = [("1x24GB", 1, 24), ("1x80GB", 1, 80), ("8x80GB", 8, 80)]
CONTEXT_GIB = 2


def fits(total_sharded: float, per_gpu: float, n_gpus: int, gib_each: int) -> bool:
    return total_sharded / n_gpus + per_gpu <= (gib_each - CONTEXT_GIB) * GiB


def table(w: Workload = Workload()) -> str:
    """Markdown table: the terms, the totals for pefrl PPO and TRL PPO / GRPO, and where each fits."""
    lines = [f"Workload: generate {w.gen_batch} x {w.seq_len} tokens, update micro-batch {w.micro_batch} x "
             f"{w.seq_len}, LoRA r={w.lora_r} on all projections, bf16 activations, gradient checkpointing on, "
             f"logits chunk {w.logits_chunk} (pefrl). GiB.", "",
             "| base | quant | base | 2 adapters + head + AdamW | KV cache | act. (no ckpt / ckpt) | logits (dense / "
             "chunked) | pefrl PPO | TRL PPO | TRL GRPO | pefrl PPO fits | TRL PPO fits | TRL GRPO fits |",
             "|" + "---|" * 13]
    g = lambda b: f"{b / GiB:.2f}" if b < 10 * GiB else f"{b / GiB:.0f}"
    for name in ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b"):
        s = SHAPES[name]
        for quant in ("bf16", "8bit", "4bit"):
            p = parts(s, quant, w)
            act_full = activation_bytes(s, w.micro_batch, w.seq_len, w.elem, False, w.lora_r)
            dense = logits_bytes(s, w.micro_batch, w.seq_len)
            step = lambda total, static: total - static  # per-GPU (unsharded) part of a total
            pe, tp, tg = pefrl_bytes(s, quant, w), trl_ppo_bytes(s, quant, w), trl_grpo_bytes(s, quant, w)
            static_pe = p["base"] + p["adapters+optim"]
            static_tp = 2 * p["base"] + trainable_bytes(lora_params(s, w.lora_r)) + 16 * s.params
            static_tg = p["base"] + trainable_bytes(lora_params(s, w.lora_r))
            fit = lambda total, static: " ".join(
                n for n, k, gib in GPUS if fits(static, step(total, static), k, gib)) or "none"
            lines.append(f"| {name} | {quant} | {g(p['base'])} | {g(p['adapters+optim'])} | {g(p['kv_cache'])} | "
                         f"{g(act_full)} / {g(p['activations'])} | {g(dense)} / {g(p['logits'])} | {g(pe)} | {g(tp)} | "
                         f"{g(tg)} | {fit(pe, static_pe)} | {fit(tp, static_tp)} | {fit(tg, static_tg)} |")
    return "\n".join(lines)


def cpu_peak_bytes(s: Shape, quant: str, rows: int, seq_len: int, response_len: int, imports: float,
                   critic: bool = True, file_bytes: float | None = None, prequantized: bool = False,
                   checkpointing: bool = False, chunk: int | None = None, fsdp_world: int = 1,
                   sharded_loading: bool = True) -> dict:
    """Peak RSS of a pefrl run on a CPU, loading included (scripts/bench_1b.py, docs/benchmarks.md's runs).
    quant: fp32 | bf16 (activations in that dtype) | 4bit | 8bit (bf16 compute). imports: RSS after imports
    (measured). Loading maps the whole checkpoint file (`file_bytes`, default bf16: 2 bytes a parameter) and,
    for a quantized base, builds the quantized copy (non-quantized weights still bf16) while the file is
    mapped; an unquantized base in the file's dtype, or a pre-quantized checkpoint, *is* the mapping. Then the step: the base (quantized:
    embeddings and norms upcast to fp32), trainable state, and one pass's activations and logits.
    fsdp_world > 1: the bf16 base sharded over that many ranks (fsdp_rank_base_bytes). sharded_loading
    (fsdp_cpu_ram_efficient_loading, pefrl/fsdp_load.py): a rank loads only that share (one tensor's file pages
    mapped at a time; then the forward that settles FSDP's root gathers layers); without it every rank loads
    the whole base first, so the load term is the unsharded one."""
    elem = 4 if quant == "fp32" else 2
    if file_bytes is None:
        file_bytes = base_bytes(s, quant, other_bytes=2) if prequantized else 2 * s.params
    if quant in ("4bit", "8bit") and not prequantized:
        load = file_bytes + base_bytes(s, quant, other_bytes=2)
    else:
        load = max(file_bytes, base_bytes(s, quant))
    adapters = lora_params(s) * (2 if critic else 1) + (s.hidden + 1 if critic else 0)
    if fsdp_world > 1 and quant not in ("bf16", "fp32"):
        raise ValueError(f"fsdp_world={fsdp_world} with {quant}: pefrl refuses quantized bases under FSDP")
    base = fsdp_rank_base_bytes(s, fsdp_world, elem) if fsdp_world > 1 else base_bytes(s, quant)
    if fsdp_world > 1 and sharded_loading:
        load = base
    step = (base + trainable_bytes(adapters) + activation_bytes(s, rows, seq_len, elem, checkpointing)
            + logits_bytes(s, rows, response_len, chunk))
    return {"load": imports + load, "step": imports + step, "peak": imports + max(load, step)}


def check(runs: list[dict]) -> str:
    """Predicted (cpu_peak_bytes) vs measured peak RSS. Each run: shape, spec (side:algo:quant[:levers], as
    scripts/bench_1b.py), rows, seq_len, response_len, measured and imports (bytes)."""
    lines = ["| base | run | predicted load / step (MiB) | predicted peak | measured peak | measured / predicted |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        side, algo, quant, *rest = r["spec"].split(":")
        levers = rest[0].split("+") if rest else []
        chunk = next((int(l[5:]) for l in levers if l.startswith("chunk")), None)
        p = cpu_peak_bytes(SHAPES[r["shape"]], quant, r["rows"], r["seq_len"], r["response_len"], r["imports"],
                           critic=algo == "ppo", prequantized="preq" in levers, checkpointing="gc" in levers,
                           chunk=chunk)
        if side == "load":  # the loader probe: no step
            p["step"], p["peak"] = p["load"], p["load"]
        m = 2**20
        lines.append(f"| {r['shape']} | {r['spec']} | {p['load'] / m:.0f} / {p['step'] / m:.0f} | {p['peak'] / m:.0f} | "
                     f"{r['measured'] / m:.0f} | {r['measured'] / p['peak']:.2f} |")
    return "\n".join(lines)


def runs_from_bench_1b(path: str, rows: int = 8, prompt_len: int = 8, response_len: int = 16) -> list[dict]:
    """The pefrl and loader runs of a scripts/bench_1b.py --out JSONL file, for check()."""
    import json

    out = []
    for line in open(path):
        rec = json.loads(line)
        res = rec["result"]
        if "failed" in res or rec["spec"].split(":")[0] not in ("pefrl", "load"):
            continue
        out.append({"shape": rec["shape"], "spec": rec["spec"], "rows": rows, "seq_len": prompt_len + response_len,
                    "response_len": response_len, "measured": res["peak_rss_bytes"],
                    "imports": res["rss_after_imports_bytes"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", help="a scripts/bench_1b.py --out JSONL: predicted vs measured peak RSS")
    p.add_argument("--run", action="append", default=[], help="one more measured run for --check: "
                   "SHAPE:SPEC:ROWSxSEQ:RESPONSE:MEASURED_MIB:IMPORTS_MIB, SPEC as bench_1b (colons as /)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    a = p.parse_args(argv)
    if a.check or a.run:
        runs = runs_from_bench_1b(a.check) if a.check else []
        for spec in a.run:
            shape, sp, rows_seq, resp, measured, imports = spec.split(":")
            rows, seq = map(int, rows_seq.split("x"))
            runs.append({"shape": shape, "spec": sp.replace("/", ":"), "rows": rows, "seq_len": seq,
                         "response_len": int(resp), "measured": float(measured) * 2**20,
                         "imports": float(imports) * 2**20})
        print(check(runs))
        return 0
    print(table(Workload(a.gen_batch, a.seq_len, a.micro_batch, a.lora_r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
