"""melora-lit: fine-tune pretrained transformers with MELoRA on PyTorch Lightning.

* :mod:`melora_lit.adapter`: the adapter (torch and safetensors only).
* :mod:`melora_lit.training`: the Lightning side (module, checkpoints, resume, monitoring,
  strategies).
* :mod:`melora_lit.data`: the data modules, with their contract in :mod:`melora_lit.data.base`.
* :mod:`melora_lit.metrics`, :mod:`melora_lit.loading`: what data and training share (metrics, the
  resumable data order), with no Lightning.
* :mod:`melora_lit.sources`: where a backbone comes from (hub, local, ``package:``, GGUF).
* :mod:`melora_lit.cli`, :mod:`melora_lit.export`, :mod:`melora_lit.report`: the commands.
"""

__version__ = "0.1.0"

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


def __getattr__(name: str):
    # the adapter's names, imported on first use: ``melora-lit`` (melora_lit.__main__) takes its
    # signals before torch is imported
    if name in __all__:
        from . import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'melora_lit' has no attribute {name!r}")
