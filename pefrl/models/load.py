"""Loading: the model path, the tokenizer, the frozen base (quantized or not) and the bundle with its adapters.

Sequences are `input_ids = cat(query_ids (B, P) left-padded, response_ids (B, T) right-padded)` everywhere
(pefrl.forward computes on them); the tokenizer is therefore left-padded.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from pefrl.arch import contiguous_head_input, disable_dropout, resolve_target_modules, stores_transposed
from pefrl.config import LoraConfig, ModelConfig
from pefrl.errors import PathError, looks_local
from pefrl.hub import check_hub_name, missing_model_error
from pefrl.models.adapters import enable_checkpointing
from pefrl.models.bundle import CRITIC, POLICY, REFERENCE, Models, ValueHead, is_lora
from pefrl.models.linear4bit import linear_4bit
from pefrl.models.prequantized import prequantized_checkpoint
from pefrl.tiny import default_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- tokenizer and paths ------------------------------------------------------------------------------------


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """model.name_or_path, or the embedded tiny arithmetic model (shipped in pefrl/assets) when it is empty."""
    name = model_cfg.name_or_path
    if not name:
        return str(default_model_dir())
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


# --- the frozen base and the bundle -------------------------------------------------------------------------


def load_base(model_cfg: ModelConfig, weights: bool = True) -> PreTrainedModel:
    """The frozen base as training uses it: model.dtype, quantized per model.quantization, dropout off.

    A 4-bit base from a local unquantized safetensors checkpoint is quantized once into pefrl's cache and loaded
    from there (model.prequantize, `models.prequantized`): loading then never holds the unquantized file.
    weights=False: the base without its weights (every parameter a stand-in, see `base_without_weights`)."""
    if not weights:
        return base_without_weights(model_cfg)
    source, dtype = resolve_model_path(model_cfg), DTYPES[model_cfg.dtype]
    quant = quantization_config(model_cfg)
    path, kwargs = source, {} if quant is None else {"quantization_config": quant, "device_map": {"": _load_device()}}
    if quant is not None and model_cfg.prequantize and not model_cfg.trust_remote_code:
        cached = prequantized_checkpoint(source, quant, dtype, _load_device())
        if cached is not None:  # its config carries the quantization
            path, kwargs = str(cached), {"device_map": kwargs["device_map"]}
    if not sys.stderr.isatty():  # a log file: transformers' "Loading weights" bar would interleave carriage returns
        hf_logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **kwargs
    )
    base.name_or_path = base.config.name_or_path = source  # the user's base, not the cache entry
    if quant is not None:
        _prepare_quantized(base)
    return _frozen(base)


def _frozen(base: PreTrainedModel) -> PreTrainedModel:
    """What every base gets, loaded or built without weights: frozen, dropout off, a contiguous head input."""
    base.requires_grad_(False)
    disable_dropout(base)
    contiguous_head_input(base)
    return base


def base_without_weights(model_cfg: ModelConfig) -> PreTrainedModel:
    """The unquantized base's modules, buffers and dtypes, its parameters stand-ins that hold no bytes.

    What every rank builds under FSDP's sharded loading (pefrl/fsdp_load.py): peft adds the adapters to it as to
    a loaded base (real CPU tensors, the same random draws, so the same adapters as `load_base` would get under
    the same seed), then each rank fills only its shard of every weight from the checkpoint. A stand-in is a CPU
    view of one zero with stride 0 (`is_stand_in`), not a meta tensor, because peft moves new adapters to their
    base weight's device. Buffers are computed, not read (rotary inv_freq is in no checkpoint).
    """
    from accelerate import init_empty_weights

    if model_cfg.quantization is not None:  # bitsandbytes quantizes while loading: there is nothing to fill
        raise ValueError(f"model.quantization={model_cfg.quantization}: a quantized base cannot be built without "
                         "its weights (FSDP refuses quantized bases anyway: fsdp.check_fsdp)")
    path = resolve_model_path(model_cfg)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    with init_empty_weights():  # parameters on the meta device (no bytes, no random init); buffers real
        base = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model_cfg.dtype],
                                                trust_remote_code=model_cfg.trust_remote_code)
    base.tie_weights()  # init_empty_weights re-registers each parameter on meta, which unties lm_head (GPT-2, ...)
    stand_ins: dict[nn.Parameter, nn.Parameter] = {}  # a tied weight is one parameter under two names: one stand-in
    for module in base.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if p not in stand_ins:
                    stand_ins[p] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
                module._parameters[name] = stand_ins[p]
    try:  # as from_pretrained: the checkpoint's generation defaults (eos ids, ...), when it has them
        base.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    base.eval()  # from_pretrained's mode; from_config builds in train mode
    return _frozen(base)


def is_stand_in(p: torch.Tensor) -> bool:
    """True for a parameter of `base_without_weights` not yet filled: more than one element, every stride 0."""
    return p.numel() > 1 and not any(p.stride())


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
      (`models.adapters.enable_checkpointing`) in load_models instead.
    - bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel on the first no-grad eval
      forward; we turn that off so the frozen base's bytes never change (and saved/merged weights stay readable).
    - LLM.int8() logs a cast warning on every fp32 matmul; `_Once` lets one through.
    - A 4-bit layer's forward dequantizes its weight into a reused buffer (pefrl.models.linear4bit: the same
      result, without the heap a fresh weight per call leaves behind on CPU).
    """
    prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if type(module).__name__ == "Linear4bit":
            module.forward = functools.partial(linear_4bit, module)
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



def _lora_config(base: PreTrainedModel, lora_cfg: LoraConfig) -> PeftLoraConfig:
    targets, excluded = resolve_target_modules(base, lora_cfg.target_modules)
    conv1d = stores_transposed(base, targets)
    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,  # peft keeps a set: their order changes nothing
        exclude_modules=excluded or None,  # same-named linears outside the decoder blocks
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_models(model_cfg: ModelConfig, lora_cfg: LoraConfig, uses_critic: bool, weights: bool = True) -> Models:
    """Load the base once, freeze it, add the adapters and the value head.

    weights=False: the base's weights are stand-ins (`base_without_weights`), for FSDP's sharded loading to fill.

    With model.reference_adapter (a LoRA-SFT adapter directory) that adapter is loaded twice: frozen as
    'reference' and trainable as 'policy', so RL starts from the SFT model and the KL is taken to it (not to
    the raw base). The policy then keeps the SFT adapter's LoRA config (lora.r/alpha/targets apply to the
    critic only).
    """
    base = load_base(model_cfg, weights)
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
        enable_checkpointing(model)
    # Set every flag explicitly: peft's set_adapter/add_adapter leave only the active adapter trainable.
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora(name, (POLICY, CRITIC)))
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

