"""The MELoRA adapter: the layer, its configuration, injection into a model, merging, the adapter
state and its files. Imports torch and safetensors only (no Lightning, no transformers), so it
can be read and reused on its own.
"""

from . import cpu_kernels
from .io import export_peft_lora, load_adapter, load_adapter_config, save_adapter
from .layer import (
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
    "cpu_kernels",
]
