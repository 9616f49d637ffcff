"""melora-lit: fine-tune pretrained transformers with MELoRA on PyTorch Lightning.

The adapter core (:mod:`melora_lit.melora`, :mod:`melora_lit.adapter_io`) imports torch and
safetensors only; the Lightning application lives in :mod:`melora_lit.module`,
:mod:`melora_lit.data` and :mod:`melora_lit.cli`.
"""

__version__ = "0.1.0"

from .adapter_io import export_peft_lora, load_adapter, load_adapter_config, save_adapter
from .melora import (
    InjectionSummary,
    MELoRAConfig,
    MELoRALinear,
    adapter_state_dict,
    inject_melora,
    load_adapter_state_dict,
    melora_layers,
    merge_melora,
)

__all__ = [
    "MELoRAConfig",
    "MELoRALinear",
    "InjectionSummary",
    "inject_melora",
    "merge_melora",
    "melora_layers",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "load_adapter_config",
    "export_peft_lora",
]
