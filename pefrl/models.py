"""One frozen base, many roles (see DESIGN.md): LoRA adapters "policy" and "critic" on one base loaded once.

```
base (frozen) ── adapter "policy"      trained: the actor
              ├─ adapter "critic"      trained, with `value_head` (model.critic='adapter')
              ├─ adapters disabled     the reference policy (default)
              └─ adapter "reference"   frozen LoRA-SFT adapter as reference (model.reference_adapter)
```
With model.critic='shared' the value head reads the policy's own last hidden state (one forward, cheapest).

Sequences are `input_ids = cat(query_ids (B, P) left-padded, response_ids (B, T) right-padded)`; every
function returns per-response-token tensors (B, T). Token t of the response is predicted at position P + t - 1,
and its value is read there too (the state before the action, as in lm-human-preference-details).

peft's `set_adapter` makes only the active adapter trainable; we train policy and critic adapters together, so
`use_adapter` switches adapters without changing any `requires_grad` flag.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from pefrl.config import LoraConfig, ModelConfig
from pefrl.errors import PathError, looks_local
from pefrl.hub import check_hub_name, missing_model_error
from pefrl.ops.logprobs import chunked_logprobs, entropy_from_logits, linear_logprobs, selective_logprobs


POLICY, CRITIC, REFERENCE = "policy", "critic", "reference"
LLAMA_LIKE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of Llama, Qwen2, Mistral, Gemma and most decoder LMs since."""
ARCH_TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc")}
"""Architectures whose projections have other names (GPT-2 uses transformers' Conv1D)."""
HEADS_FILE, VALUE_HEAD_FILE = "pefrl_heads.json", "value_head.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- target modules -----------------------------------------------------------------------------------------


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear / Conv1D layers LoRA could adapt, output embeddings excluded."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not out_emb and name
    }
    return sorted(names)


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """Attention + MLP projections: Llama-like names when present, GPT-2's, else every linear but lm_head."""
    existing = set(linear_module_names(model))
    llama_like = [n for n in LLAMA_LIKE_TARGETS if n in existing]
    if llama_like:
        return llama_like
    arch = ARCH_TARGETS.get(getattr(model.config, "model_type", ""))
    if arch:
        return [n for n in arch if n in existing]
    return sorted(existing)


def resolve_target_modules(model: PreTrainedModel, targets: list[str] | None) -> list[str]:
    """`targets`, or the defaults when None; a name that matches no linear layer raises naming those that exist."""
    if targets is None:
        return default_target_modules(model)
    existing = linear_module_names(model)
    missing = [t for t in targets if t not in existing]
    if missing or not targets:
        raise ValueError(
            f"lora.target_modules {missing or targets} match no linear layer of this "
            f"{getattr(model.config, 'model_type', 'model')}; linear layers it has: {existing}"
        )
    return list(targets)


# --- tokenizer and paths ------------------------------------------------------------------------------------


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """model.name_or_path, or the embedded tiny arithmetic model (built if missing) when it is empty."""
    name = model_cfg.name_or_path
    if not name:
        from pefrl.tasks import arithmetic  # lazy: only the default model needs the task

        # built on first use (a few CPU-minutes) by scripts/build_tiny_model.py, then cached in pefrl/assets
        return str(arithmetic.ensure_default_model(arithmetic.DEFAULT_MODEL_DIR))
    if looks_local(name) or Path(name).exists():
        if not Path(name).expanduser().exists():
            raise missing_model_error(name)  # names the preparation commands for pefrl's cache
        return str(Path(name).expanduser())
    check_hub_name(name, "model.name_or_path")  # offline: at once, not after the hub client's retries
    return name


def load_tokenizer(model_cfg: ModelConfig):
    """The base's tokenizer, left-padded (generation appends on the right). No pad token: EOS pads, warned."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(
                f"tokenizer of {resolve_model_path(model_cfg)} has neither a pad nor an EOS token; "
                "add a pad token to it before RL fine-tuning"
            )
        warnings.warn(f"tokenizer has no pad token; using EOS {tok.eos_token!r} as pad", stacklevel=2)
        tok.pad_token = tok.eos_token
    return tok


# --- the model bundle ---------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """Linear(hidden, 1) in fp32 on the last hidden state; init std 1/sqrt(H + 1) as in
    lm-human-preference-details' scalar heads, so initial values are O(1) and the critic adapter gets gradient."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)  # (B, T, H) -> (B, T)


@dataclass
class Models:
    """The frozen base with its adapters, and the value head. Temperature is the callers' business."""

    model: PeftModel
    """peft model over the frozen base; adapters 'policy' (+ 'critic', + 'reference')."""
    value_head: ValueHead | None
    """Value head (fp32) when the algorithm uses a critic, else None."""
    critic: str
    """'adapter' (own LoRA adapter 'critic' + head), 'shared' (head on the policy trunk) or 'none'."""
    reference: str | None
    """None: the reference is the base with adapters disabled; else the name of a frozen adapter."""
    critic_from: int | None = None
    """Index of the lowest decoder layer the critic adapter adapts (model.critic_layers); below it the critic is
    the frozen base. None: the critic adapter covers every layer (or there is none)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Policy adapter, critic adapter and value head parameters: all the optimizer may touch."""
        names = (POLICY, CRITIC) if self.critic == "adapter" else (POLICY,)
        params = [
            p for n, p in self.model.named_parameters() if "lora_" in n and any(f".{a}." in n for a in names)
        ]
        return params + (list(self.value_head.parameters()) if self.value_head is not None else [])


def load_base(model_cfg: ModelConfig) -> PreTrainedModel:
    """The frozen base as training uses it: model.dtype, quantized per model.quantization, dropout off."""
    quant = quantization_config(model_cfg)
    kwargs = {} if quant is None else {"quantization_config": quant, "device_map": {"": _load_device()}}
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_cfg),
        dtype=DTYPES[model_cfg.dtype],
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if quant is not None:
        _prepare_quantized(base)
    base.requires_grad_(False)
    _disable_dropout(base)
    return base


# --- quantized bases (QLoRA, Dettmers et al. 2023) -----------------------------------------------------------


def quantization_config(model_cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes config for model.quantization ('4bit' / '8bit'), or None for an unquantized base.

    4-bit: nf4 or fp4 blocks, optional double quantization of the block constants; matmuls dequantize to
    model.dtype (the compute dtype). 8-bit: LLM.int8() with fp16 outlier matmuls (bitsandbytes' fixed choice).
    """
    if model_cfg.quantization is None:
        return None
    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=DTYPES[model_cfg.dtype],
    )


def _load_device() -> torch.device:
    # bitsandbytes quantizes while loading, on the device the weights land on, and a quantized model cannot be
    # moved afterwards; so load straight onto this process's device (Accelerate's choice: cuda:<local rank>).
    from accelerate import PartialState

    return PartialState().device


def _prepare_quantized(base: PreTrainedModel) -> None:
    """peft's prepare_model_for_kbit_training, minus its gradient checkpointing, plus two CPU/log fixes.

    - It freezes the base and upcasts every non-quantized fp16/bf16 parameter (norms, embeddings, lm_head) to
      fp32, as QLoRA does for stable training; the quantized matmuls still compute in model.dtype.
    - Its checkpointing is re-entrant and adapter-unaware; model.gradient_checkpointing switches on ours
      (`_enable_checkpointing`) in load_models instead.
    - bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel on the first no-grad eval
      forward; we turn that off so the frozen base's bytes never change (and saved/merged weights stay readable).
    - LLM.int8() logs a cast warning on every fp32 matmul; `_Once` lets one through.
    """
    prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in bnb_logger.filters):
        bnb_logger.addFilter(_Once("MatMul8bitLt: inputs will be cast"))


class _Once(logging.Filter):
    """Let the first record starting with `prefix` through, drop the rest (other records pass)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def is_quantized(model: nn.Module) -> bool:
    """True when the model (or the base under a peft model) holds bitsandbytes 4-bit / 8-bit weights."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def _disable_dropout(model: nn.Module) -> None:
    # Dropout makes the rollout's logprobs and the update's disagree at ratio 1 (TRL's disable_dropout_in_model
    # does the same). Attention dropout is a float on Llama-like attention modules, an nn.Dropout on GPT-2.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _lora_config(base: PreTrainedModel, lora_cfg: LoraConfig) -> PeftLoraConfig:
    targets = resolve_target_modules(base, lora_cfg.target_modules)
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in base.named_modules())
    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_models(model_cfg: ModelConfig, lora_cfg: LoraConfig, uses_critic: bool) -> Models:
    """Load the base once, freeze it, add the adapters and the value head.

    With model.reference_adapter (a LoRA-SFT adapter directory) that adapter is loaded twice: frozen as
    'reference' and trainable as 'policy', so RL starts from the SFT model and the KL is taken to it (not to
    the raw base). The policy then keeps the SFT adapter's LoRA config (lora.r/alpha/targets apply to the
    critic only).
    """
    base = load_base(model_cfg)
    peft_cfg = _lora_config(base, lora_cfg)  # before any wrapping: LoRA layers rename what they wrap
    reference = None
    if model_cfg.reference_adapter:
        ref_dir = model_cfg.reference_adapter
        if not Path(ref_dir).is_dir():
            raise PathError(f"model.reference_adapter {ref_dir} does not exist")
        model = PeftModel.from_pretrained(base, ref_dir, adapter_name=POLICY, is_trainable=True)
        model.load_adapter(ref_dir, adapter_name=REFERENCE, is_trainable=False)
        reference = REFERENCE
    else:
        model = get_peft_model(base, copy.deepcopy(peft_cfg), adapter_name=POLICY)
    critic = model_cfg.critic if uses_critic else "none"
    critic_from = None
    if critic == "adapter":
        critic_cfg = copy.deepcopy(peft_cfg)
        if model_cfg.critic_layers is not None:
            critic_from = _top_layers(base, model_cfg.critic_layers, critic_cfg)
        model.add_adapter(CRITIC, critic_cfg)
    model.set_adapter(POLICY)
    if model_cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    # Set every flag explicitly: peft's set_adapter/add_adapter leave only the active adapter trainable.
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and (f".{POLICY}." in name or f".{CRITIC}." in name))
    value_head = None
    if uses_critic:
        device = next(base.parameters()).device
        value_head = ValueHead(base.config.get_text_config().hidden_size).to(device)
    return Models(model=model, value_head=value_head, critic=critic, reference=reference, critic_from=critic_from)


def _top_layers(base: PreTrainedModel, n: int, peft_cfg: PeftLoraConfig) -> int:
    """Restrict peft_cfg to the top n decoder layers (peft's layers_to_transform) -> index of the lowest one."""
    total = base.config.get_text_config().num_hidden_layers
    if n > total:
        raise ValueError(f"model.critic_layers is {n}, but this {base.config.model_type} has {total} layers")
    peft_cfg.layers_to_transform = list(range(total - n, total))
    return total - n


def _enable_checkpointing(model: PeftModel) -> None:
    """Activation checkpointing whose backward recomputes each layer under the adapter that ran its forward.

    Without this, a critic forward recomputed in backward (after use_adapter has switched back to the policy)
    would run through the policy adapter and give the critic wrong gradients. Non-reentrant checkpointing's
    `context_fn` gives the recompute its own context.
    """

    def context_fn():
        forward_adapter = _current_adapter(model)  # read at forward time
        return nullcontext(), use_adapter(model, forward_adapter)

    model.get_base_model().activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn}
    )


def _current_adapter(model: PeftModel) -> str | None:
    return getattr(model, "_pefrl_adapter", model.active_adapter)  # set by use_adapter; None = disabled


@contextmanager
def use_adapter(models_or_model: Models | PeftModel, name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active (None: all adapters disabled, i.e. the base).

    Every requires_grad flag is kept as it was (peft's set_adapter / disable_adapter would freeze the inactive
    adapters); the previous adapter and flags are restored even when the block raises.
    """
    model = models_or_model.model if isinstance(models_or_model, Models) else models_or_model
    if _current_adapter(model) == name:  # already active: peft's set_adapter walks every module, skip it
        yield
        return
    flags = {p: p.requires_grad for p in model.parameters()}
    previous, previous_name = model.active_adapter, _current_adapter(model)

    def restore_flags() -> None:
        for p, flag in flags.items():
            p.requires_grad_(flag)

    with ExitStack() as stack:
        try:
            if name is None:
                stack.enter_context(model.disable_adapter())
            else:
                if name not in model.peft_config:
                    raise KeyError(f"no adapter {name!r}; adapters: {list(model.peft_config)}")
                model.set_adapter(name)
            restore_flags()
            model._pefrl_adapter = name
            yield
        finally:
            stack.close()  # re-enables adapters if they were disabled
            if model.active_adapter != previous:
                model.set_adapter(previous)
            restore_flags()
            model._pefrl_adapter = previous_name


# --- forward passes -----------------------------------------------------------------------------------------


def _lm(models: Models) -> PreTrainedModel:
    return models.model.get_base_model()  # the HF causal LM, LoRA layers injected in place


def _response_hidden(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """Last hidden states at the positions that predict the response tokens: (B, T, H), T = L - P.

    Runs the trunk only (no lm_head), so no logits are computed for the prompt. Positions come from the mask
    as in `generate`, so a left-padded prompt sees the same positions in both.
    """
    if not 0 < prompt_len < input_ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {input_ids.shape[1] - 1}], got {prompt_len}")
    lm = _lm(models)
    trunk = getattr(lm, lm.base_model_prefix, None)  # LlamaModel under .model, GPT2Model under .transformer
    if trunk is None:
        raise NotImplementedError(f"{type(lm).__name__} has no trunk at .{lm.base_model_prefix}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    # contiguous: F.linear on the strided slice runs as a batched matmul against an expanded weight, which on CPU
    # took 2x the time of the plain matmul for the lm_head forward and backward (SmolLM2, 384 x 49152 logits)
    return out[0][:, prompt_len - 1 : -1].contiguous()  # (B, T, H)


class LogitsHead(nn.Module):
    """lm_head plus the fixed post-processing some architectures apply to its output, so that chunked logprobs
    from hidden states match the model's own logits: Gemma 2/3 soft-capping (cap * tanh(logits / cap)),
    Cohere's logit_scale (multiply), Granite's logits_scaling (divide)."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm_head = lm.get_output_embeddings()
        cfg = lm.config.get_text_config()
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None)
        self.divide = getattr(cfg, "logits_scaling", None)

    def is_plain_linear(self) -> bool:
        """logits = hidden @ weight^T exactly: an unwrapped, bias-free nn.Linear and no post-processing."""
        plain = type(self.lm_head) is nn.Linear and self.lm_head.bias is None
        plain = plain and not isinstance(self.lm_head.weight, DTensor)  # FSDP-sharded: only its forward gathers
        return plain and self.scale is None and self.divide is None and self.softcap is None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _logprobs(models: Models, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
              chunk_size: int | None, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    lm_head = LogitsHead(_lm(models))
    if chunk_size is not None:
        return chunked_logprobs(hidden, lm_head, tokens, temperature, chunk_size, with_entropy)
    if not with_entropy and lm_head.is_plain_linear():
        B, T, H = hidden.shape
        logprobs = linear_logprobs(hidden.reshape(B * T, H), lm_head.lm_head.weight, tokens.reshape(B * T),
                                   temperature)  # (B * T,)
        return logprobs.reshape(B, T), None
    logits = lm_head(hidden)  # (B, T, V)
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return selective_logprobs(logits, tokens, temperature), entropy


def policy_forward(
    models: Models,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
    with_values: bool = False,
    chunk_size: int | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Policy logprobs and entropy of the response tokens, (B, T) each, and values (B, T) from the shared head.

    input_ids/attention_mask: (B, L) = cat(query (B, P) left-padded, response (B, T) right-padded).
    chunk_size: compute logits this many positions at a time (see chunked_logprobs); None: all at once.
    with_values needs model.critic='shared' (the adapter critic runs its own forward: critic_values).
    with_entropy=False: no entropy (None), and none of the (B, T, V) softmax passes it costs.
    """
    if with_values and models.critic != "shared":
        raise ValueError(f"with_values needs the shared critic; critic is {models.critic!r}: use critic_values")
    tokens = input_ids[:, prompt_len:]  # (B, T)
    with use_adapter(models, POLICY):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        logprobs, entropy = _logprobs(models, hidden, tokens, temperature, chunk_size, with_entropy)
        values = models.value_head(hidden) if with_values else None
    return logprobs, entropy, values


def critic_values(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  critic_inputs: torch.Tensor | None = None):
    """Values (B, T) of the states before each response token: critic adapter + head, or the shared head.

    critic_inputs: (B, L - 1, H), the base's hidden states entering layer `models.critic_from` at positions 0..L-2 of
    input_ids (B, L) (Rollout.critic_inputs, from the sampler's reference rows). Below that layer the critic is
    the base, so the forward starts there: only the critic's own layers run (pefrl.decode.upper_layers)."""
    if models.value_head is None:
        raise ValueError("these models have no critic (load_models(..., uses_critic=False))")
    if critic_inputs is not None:
        from pefrl.decode import upper_layers  # decode imports this module

        if models.critic_from is None:
            raise ValueError("critic_inputs need a critic on the top layers (model.critic_layers)")
        mask = attention_mask[:, :-1]  # (B, L - 1): the last position predicts nothing a value is read for
        hidden = upper_layers(_lm(models), critic_inputs, mask, models.critic_from, CRITIC)  # (B, L - 1, H)
        return models.value_head(hidden[:, prompt_len - 1 :])  # (B, T)
    with use_adapter(models, CRITIC if models.critic == "adapter" else POLICY):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        return models.value_head(hidden)


@torch.no_grad()
def reference_logprobs(models: Models, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                       temperature: float, chunk_size: int | None = None) -> torch.Tensor:
    """Reference logprobs (B, T): adapters disabled (the base), or the frozen reference adapter."""
    tokens = input_ids[:, prompt_len:]  # (B, T)
    with use_adapter(models, models.reference):
        hidden = _response_hidden(models, input_ids, attention_mask, prompt_len)  # (B, T, H)
        return _logprobs(models, hidden, tokens, temperature, chunk_size, with_entropy=False)[0]


# --- saving -------------------------------------------------------------------------------------------------


def save_adapters(models: Models, out_dir: str | Path) -> None:
    """Every adapter in peft format (out_dir/<name>/adapter_model.safetensors + adapter_config.json), the value
    head as value_head.safetensors, and pefrl_heads.json saying how they fit together."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(models.model.peft_config)
    models.model.save_pretrained(str(out), selected_adapters=names, safe_serialization=True)
    if models.value_head is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in models.value_head.state_dict().items()}
        save_file(state, str(out / VALUE_HEAD_FILE))
    meta = {"adapters": names, "critic": models.critic, "reference": models.reference,
            "value_head": models.value_head is not None}
    (out / HEADS_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_adapters(models: Models, in_dir: str | Path) -> None:
    """Load weights written by save_adapters into `models` (same adapters and critic mode), for resume or eval.

    Adapters the checkpoint has but `models` lacks (e.g. 'critic' when evaluating without a critic) are skipped;
    an adapter or head `models` has but the checkpoint lacks raises, since resuming would silently restart it.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    src = Path(in_dir)
    meta_path = src / HEADS_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} missing: {src} is not a pefrl adapter directory")
    meta = json.loads(meta_path.read_text())
    for name in models.model.peft_config:
        if name not in meta["adapters"]:
            raise ValueError(f"checkpoint {src} has no adapter {name!r} (it has {meta['adapters']})")
        weights = load_peft_weights(str(src / name), device=str(next(models.model.parameters()).device))
        result = set_peft_model_state_dict(models.model, weights, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter {name!r} in {src} does not fit: unexpected {result.unexpected_keys[:5]}")
    if models.value_head is not None:
        if not meta["value_head"] or meta["critic"] != models.critic:
            raise ValueError(f"checkpoint {src} critic is {meta['critic']!r}, models use {models.critic!r}")
        head = load_file(str(src / VALUE_HEAD_FILE), device=str(next(models.value_head.parameters()).device))
        models.value_head.load_state_dict(head)
