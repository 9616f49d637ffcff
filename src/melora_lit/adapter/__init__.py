"""The MELoRA adapter: the layer (:mod:`.layer`), its configuration, injection into a model,
merging and the adapter state (:mod:`.inject`), and its files (:mod:`.io`). Imports torch and
safetensors only (no Lightning, no transformers), so it can be read and reused on its own.
"""

from . import cpu_kernels
from .inject import (
    InjectionSummary,
    MELoRAConfig,
    adapter_params,
    adapter_state_dict,
    inject_melora,
    load_adapter_state_dict,
    melora_layers,
    merge_melora,
    resolve_modules_to_save,
)
from .io import export_peft_lora, load_adapter, load_adapter_config, save_adapter
from .layer import MELoRALinear

__all__ = [
    "MELoRAConfig",
    "MELoRALinear",
    "InjectionSummary",
    "inject_melora",
    "merge_melora",
    "melora_layers",
    "adapter_params",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "resolve_modules_to_save",
    "save_adapter",
    "load_adapter",
    "load_adapter_config",
    "export_peft_lora",
    "cpu_kernels",
]
