"""One frozen base, many roles (see DESIGN.md): LoRA adapters "policy" and "critic" on one base loaded once.

    models/bundle.py     Models (the base, its adapters, the value head), role names, which parameters are LoRA
    models/adapters.py   use_adapter: switch adapters without touching requires_grad; adapter-aware checkpointing
    models/load.py       model path, tokenizer, the frozen base (quantized or not), load_models
    models/prequantized.py  a 4-bit base quantized once, tensor by tensor, into pefrl's cache (model.prequantize)
    models/linear4bit.py    a 4-bit layer's forward on CPU with its weight dequantized into a reused buffer

The forward passes over the bundle are in pefrl.forward, saving and loading adapters in pefrl.adapters_io.
"""

from pefrl.models.adapters import current_adapter, enable_checkpointing, use_adapter
from pefrl.models.bundle import CRITIC, POLICY, REFERENCE, Models, ValueHead, is_lora, lora_parameters
from pefrl.models.load import (
    DTYPES,
    is_quantized,
    load_base,
    load_models,
    load_tokenizer,
    quantization_config,
    resolve_model_path,
)

__all__ = ["CRITIC", "DTYPES", "POLICY", "REFERENCE", "Models", "ValueHead", "current_adapter",
           "enable_checkpointing", "is_lora", "is_quantized", "load_base", "load_models", "load_tokenizer",
           "lora_parameters", "quantization_config", "resolve_model_path", "use_adapter"]
