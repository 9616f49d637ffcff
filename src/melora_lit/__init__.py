"""melora-lit: fine-tune pretrained transformers with MELoRA on PyTorch Lightning.

* :mod:`melora_lit.adapter`: the adapter (torch and safetensors only).
* :mod:`melora_lit.training`: the Lightning side (module, checkpoints, resume, monitoring,
  strategies).
* :mod:`melora_lit.data`: the data modules, with their contract in :mod:`melora_lit.data.base`.
* :mod:`melora_lit.sources`: where a backbone comes from (hub, local, ``package:``, GGUF).
* :mod:`melora_lit.cli`, :mod:`melora_lit.export`, :mod:`melora_lit.report`: the commands.
"""

__version__ = "0.1.0"

from .adapter import (
    InjectionSummary,
    MELoRAConfig,
    MELoRALinear,
    adapter_params,
    adapter_state_dict,
    export_peft_lora,
    inject_melora,
    load_adapter,
    load_adapter_config,
    load_adapter_state_dict,
    melora_layers,
    merge_melora,
    save_adapter,
)

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
    "save_adapter",
    "load_adapter",
    "load_adapter_config",
    "export_peft_lora",
]
