"""Putting MELoRA into a model and taking it out: the config, which modules are adapted,
injection, merging, and the adapter's state.

The contract is explicit: :func:`inject_melora` returns an :class:`InjectionSummary` holding the
config as injected and the resolved ``modules_to_save``; whatever needs them afterwards takes
them as arguments (:func:`adapter_params`, :func:`adapter_state_dict`,
:func:`load_adapter_state_dict`, and the files of :mod:`melora_lit.adapter.io`). Nothing is
stored on the model besides its :class:`~melora_lit.adapter.layer.MELoRALinear` layers. Which
tensors are the adapter's is said once, by :func:`is_adapter_key`: the optimizer's parameters,
the checkpoints' keys and the parameter counts all follow it.

Module names are matched two ways:

* ``target_modules``, ``exclude_modules``, ``modules_to_save``: an entry matches a module's last
  name component (``query``), a dotted suffix or the full path, or is a regular expression
  matched against the full path.
* ``rank_pattern``, ``n_pattern``: PEFT's rule, a regular expression matched against the end of
  the path at a dot boundary (``re.match(rf"(.*\\.)?({key})$", path)``), so a pattern copied
  from a PEFT config selects the same modules. A key that selects no adapted module is an error.

Torch only: no Lightning, no transformers import.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from .layer import MELoRALinear, _check_hparams, _check_shape, _features, _is_linear

__all__ = [
    "MELoRAConfig",
    "InjectionSummary",
    "inject_melora",
    "merge_melora",
    "melora_layers",
    "adapter_params",
    "adapter_state_dict",
    "is_adapter_key",
    "load_adapter_state_dict",
    "resolve_modules_to_save",
    "TASK_HEADS",
    "fresh_heads",
]

#: The output heads of transformers' task models, by PEFT task type (plus ``MASKED_LM``, BERT's
#: ``cls``). ``"all-linear"`` never adapts a head: heads are small and task-specific, and belong
#: in ``modules_to_save``.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": ("lm_head",),
    "MASKED_LM": ("cls",),
}
# Task types whose head is built fresh for the task: it is trained and saved with the adapter
# (PEFT puts it into modules_to_save by itself), where a language model's head is pretrained.
_FRESH_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_HEAD_NAMES = frozenset(h for heads in TASK_HEADS.values() for h in heads)


def fresh_heads(task_type: str | None) -> tuple[str, ...]:
    """The head names that a model of this PEFT task type builds fresh, so trains and saves."""
    return TASK_HEADS[task_type] if task_type in _FRESH_HEAD_TASKS else ()


@dataclass
class MELoRAConfig:
    """Which modules get MELoRA adapters, and their shape.

    Args:
        r: rank of each mini LoRA (the paper's per-mini rank).
        n: number of mini LoRAs per adapted layer; the update has rank ``n * r``.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: modules to adapt. Each entry matches a module's last name component
            (``query``), a dotted suffix or full path (``encoder.layer.0.attention.self.query``)
            or is a regular expression matched against the full path. ``"all-linear"`` adapts
            every linear layer except the output head.
        exclude_modules: modules never adapted, matched the same way.
        modules_to_save: modules trained in full and saved with the adapter (e.g. the
            classification head ``classifier``).
        init: initialisation of A: ``"kaiming"`` (paper's code) or ``"gaussian"``.
        rank_pattern: per-module override of ``r``, ``{pattern: r}``, matched as PEFT does: a
            regular expression on the end of the module path (``layer\\.0\\.attention\\.self\\.query``,
            ``value``); first match wins; a pattern that selects no adapted module is an error.
        n_pattern: per-module override of ``n``, ``{pattern: n}``, matched like ``rank_pattern``.
    """

    r: int = 8
    n: int = 2
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    exclude_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    n_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_hparams("config", self.r, self.n, self.alpha, self.dropout)
        for option in ("rank_pattern", "n_pattern"):
            for pat, v in getattr(self, option).items():
                if not isinstance(v, int) or v < 1:
                    raise ValueError(f"pattern {pat!r} sets {v!r}; overrides of r and n must be integers >= 1")
                try:
                    re.compile(pat)
                except re.error as err:
                    raise ValueError(f"{option} key '{pat}' is not a valid regular expression ({err})") from None
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={self.init!r} is not valid; use 'kaiming' or 'gaussian'")

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(name: str, pattern: str) -> bool:
    """target_modules / exclude_modules / modules_to_save: last component, dotted suffix, full
    path, or a regular expression on the full path."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _pattern_matches(name: str, key: str) -> bool:
    """rank_pattern / n_pattern keys: PEFT's rule (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _first_match(name: str, patterns: dict[str, int], default: int) -> int:
    for key, value in patterns.items():
        if _pattern_matches(name, key):
            return value
    return default


def _head_modules(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {name for name, module in model.named_modules() if module is out or name.split(".")[0] in _HEAD_NAMES}


def _some_names(model: nn.Module, linear_only: bool = False, k: int = 8) -> str:
    names = [n for n, m in model.named_modules() if n and (not linear_only or _is_linear(m))]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return ", ".join(leaves[:k]) + (", ..." if len(leaves) > k else "")


def _within(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def melora_layers(model: nn.Module) -> dict[str, MELoRALinear]:
    """All MELoRA layers of a model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MELoRALinear)}


def resolve_modules_to_save(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The outermost module paths that ``patterns`` select (so each parameter is saved once).

    Raises ``ValueError`` naming a pattern that selects nothing.
    """
    names = [name for name, _ in model.named_modules() if name and any(_matches(name, p) for p in patterns)]
    missing = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module; some that exist: {_some_names(model)}")
    return [n for n in names if not any(n.startswith(s + ".") for s in names)]


@dataclass
class InjectionSummary:
    """What :func:`inject_melora` did, and what the adapter's state needs afterwards.

    Attributes:
        config: the config as injected.
        modules: the wrapped modules by path, with d_in, d_out, n, r and the equivalent rank n*r.
        modules_to_save: the module paths trained in full and saved with the adapter.
        adapter_params: number of MELoRA parameters (all A and B factors).
        trainable_params: number of trainable parameters (adapter and saved modules).
        total_params: number of parameters of the model.
    """

    config: MELoRAConfig
    modules: dict[str, dict[str, int]]
    modules_to_save: list[str]
    adapter_params: int
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        lines = [f"{'module':<60} {'d_in':>6} {'d_out':>6} {'n':>4} {'r':>4} {'rank':>5}"]
        for name, s in self.modules.items():
            lines.append(f"{name:<60} {s['d_in']:>6} {s['d_out']:>6} {s['n']:>4} {s['r']:>4} {s['rank']:>5}")
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines.append(
            f"MELoRA: {len(self.modules)} modules, {self.adapter_params:,} adapter params; "
            f"trainable {self.trainable_params:,} of {self.total_params:,} ({pct:.4f}%)"
        )
        return "\n".join(lines)


def inject_melora(model: nn.Module, config: MELoRAConfig) -> InjectionSummary:
    """Wrap the modules selected by ``config`` in :class:`MELoRALinear`, in place.

    Every other parameter is frozen, except those of ``config.modules_to_save``.
    Raises ``ValueError`` with a one-line message on any invalid setting, before changing
    anything.
    """
    existing = melora_layers(model)
    if existing:
        raise ValueError(
            f"model already has {len(existing)} MELoRA layers (e.g. {next(iter(existing))}); "
            "merge_melora() it or start from a fresh model before injecting again"
        )
    heads = _head_modules(model)
    all_linear = config.target_modules == "all-linear"
    targets = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    save_names = resolve_modules_to_save(model, config.modules_to_save)

    chosen = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or _within(name, save_names):
            continue
        if any(_matches(name, p) for p in config.exclude_modules):
            continue
        if all_linear:
            if _within(name, heads):
                continue
        elif not any(_matches(name, p) for p in targets):
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no linear layer; "
            f"some linear layers that exist: {_some_names(model, linear_only=True)}"
        )
    for option in ("rank_pattern", "n_pattern"):
        for key in getattr(config, option):
            if not any(_pattern_matches(name, key) for name in chosen):
                shown = ", ".join(chosen[:3]) + (", ..." if len(chosen) > 3 else "")
                raise ValueError(
                    f"{option} key '{key}' matches none of the {len(chosen)} adapted modules ({shown}); "
                    "a key is a regular expression matched against the end of a module path, as in PEFT"
                )

    # validate everything before changing anything, so a bad setting leaves the model intact
    plan = {}
    for name in chosen:
        d_in, d_out = _features(model.get_submodule(name))
        r = _first_match(name, config.rank_pattern, config.r)
        n = _first_match(name, config.n_pattern, config.n)
        _check_shape(name, d_in, d_out, r, n)
        plan[name] = (r, n)

    model.requires_grad_(False)
    modules = {}
    for name, (r, n) in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MELoRALinear(getattr(parent, child), r=r, n=n, alpha=config.alpha,
                             dropout=config.dropout, init=config.init)
        layer.train(layer.base.training)  # a new module defaults to training mode
        setattr(parent, child, layer)
        modules[name] = {"d_in": layer.d_in, "d_out": layer.d_out, "n": n, "r": r, "rank": n * r}
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)

    return InjectionSummary(
        config=config,
        modules=modules,
        modules_to_save=save_names,
        adapter_params=sum(p.numel() for p in adapter_params(model, ()).values()),
        trainable_params=sum(p.numel() for p in adapter_params(model, save_names).values()),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def merge_melora(model: nn.Module) -> nn.Module:
    """Replace every MELoRA layer by its base layer holding the merged weight, in place.

    The result is a plain model of the original classes: it runs and saves (e.g. with
    ``save_pretrained``) without melora_lit.
    """
    for name, layer in melora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


# torch's wrappers (FSDP1 units, activation checkpointing, torch.compile) insert a path component:
# a saved module is named as before wrapping
_WRAPPER_COMPONENT = re.compile(r"(?<![^.])(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def is_adapter_key(name: str, layers: Collection[str], modules_to_save: Sequence[str]) -> bool:
    """Whether the parameter or state-dict key ``name`` of a model belongs to the adapter's
    trained and saved state: ``lora_A`` or ``lora_B`` of a MELoRA layer (``layers``: their module
    paths, :func:`melora_layers`), or any tensor of ``modules_to_save`` (module paths, e.g.
    :attr:`InjectionSummary.modules_to_save`)."""
    module, _, leaf = name.rpartition(".")
    return (leaf in ("lora_A", "lora_B") and module in layers) or _within(_WRAPPER_COMPONENT.sub("", module),
                                                                          modules_to_save)


def adapter_params(model: nn.Module, modules_to_save: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters the adapter trains (:func:`is_adapter_key`), by name and in the order of
    ``model.named_parameters()``. A parameter a saved module shares (an output head tied to the
    input embeddings) is in, under the name ``named_parameters()`` gives it."""
    layers = melora_layers(model)
    chosen = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
              if is_adapter_key(name, layers, modules_to_save)}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def adapter_state_dict(model: nn.Module, modules_to_save: Sequence[str]) -> dict[str, torch.Tensor]:
    """The adapter's part of ``model.state_dict()``: every MELoRA layer's factors and the
    tensors (parameters and buffers) of ``modules_to_save`` (module paths, e.g.
    :attr:`InjectionSummary.modules_to_save`), keyed as in the model."""
    layers = melora_layers(model)
    return {k: t for k, t in model.state_dict().items() if is_adapter_key(k, layers, modules_to_save)}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                            modules_to_save: Sequence[str]) -> None:
    """Load adapter (and saved-module) tensors into a model that has MELoRA injected.

    Raises ``ValueError`` naming the first missing or unexpected key or shape mismatch, before
    changing anything.
    """
    expected = adapter_state_dict(model, modules_to_save)
    if not expected:
        raise ValueError("model has no MELoRA layers; inject_melora() it with the adapter's config first")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise ValueError(f"adapter state is missing key {missing[0]!r} ({len(missing)} missing in all); "
                         "it was saved from a different model or MELoRA config")
    if unexpected:
        raise ValueError(f"adapter state has unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                         "it was saved from a different model or MELoRA config")
    for k, t in expected.items():
        if tuple(state_dict[k].shape) != tuple(t.shape):
            raise ValueError(f"adapter key {k!r}: expected shape {tuple(t.shape)}, found {tuple(state_dict[k].shape)}")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state_dict[k])
