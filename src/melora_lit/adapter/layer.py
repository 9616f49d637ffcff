"""MELoRA: mini-ensemble low-rank adapters (Ren et al., ACL 2024).

A frozen linear map W (d_out x d_in) gets n mini LoRAs on equal, contiguous slices of its
input and output features:

    y = W x + (alpha / r) * blockdiag(B_1 A_1, ..., B_n A_n) x

A_i is (r x d_in/n), B_i is (d_out/n x r). The update has rank n*r for the parameters of a
rank-r LoRA; n = 1 is plain LoRA.

This module is the whole adapter: the layer, the config, injection into a model, merging and
the adapter state. It depends on torch only (no Lightning, no transformers import), so it can
be read and reused on its own. In fp32 and bf16 on CPU the layer runs the fused C++ kernels
of :mod:`melora_lit.adapter.cpu_kernels` when they can be built; everywhere else, and as their
fallback, the plain-torch :class:`_MELoRAFunction` below, which computes the same function.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

__all__ = [
    "MELoRAConfig",
    "MELoRALinear",
    "InjectionSummary",
    "inject_melora",
    "merge_melora",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "melora_layers",
]

# Output heads are never adapted by "all-linear": they are small, task-specific, and
# belong in modules_to_save instead.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight stored (d_in, d_out). Duck-typed so that the
    # core does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or Conv1D."""
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return module.in_features, module.out_features


def _dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The (d_out, d_in) weight of a plain Linear or Conv1D; None for anything else (a quantized
    weight included: its own F.linear dequantizes on the fly, see adapter/quantize.py)."""
    if type(module) is nn.Linear and type(module.weight) is nn.Parameter:
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    return None


# With the CPU kernels, folding the update into the weight (two weight-sized copies per
# step) beats adding it to the activations (two activation-sized passes) from about this
# many tokens per feature on; measured in docs/benchmarks.md.
_FOLD_TOKENS_PER_FEATURE = 4


def _block_diag(t: torch.Tensor) -> torch.Tensor:
    """(n, p, q) -> the (n*p, n*q) block-diagonal matrix of its n blocks (no autograd)."""
    n, p, q = t.shape
    out = t.new_zeros(n, p, n, q)
    out.diagonal(dim1=0, dim2=2).copy_(t.permute(1, 2, 0))
    return out.view(n * p, n * q)


class _MELoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s * blockdiag(B_i A_i) xd, forward and backward written out by hand.

    Autograd's version makes extra full passes over the activations (a separate add for the
    update, a clone and an add to accumulate the two input gradients); on CPU those passes
    cost more than the adapter's FLOPs. Here:

    * The per-block products run as one batched matmul over the n blocks, shaped
      (n, r, d_in/n) @ (n, d_in/n, T) -> (n, r, T): T, the long dimension, is the output's
      columns. That is the shape BLAS runs fastest (2-3x faster on CPU than the (T, d) @
      (d, n*r) product with the zero-padded block-diagonal factor, which also does n times
      the FLOPs), and the factor gradients come out per block, in the parameters' shape.
    * With ``fold`` (no dropout, fp32/fp64, tokens >= 4x features) the update is folded into
      the weight for the two big GEMMs: y = x (W + s B'A')^T + b and dx = g (W + s B'A'), so
      the adapter adds no pass over y or dx at all. W + s B'A' is a temporary the size of W,
      built in forward and again in backward (never saved).
    * Otherwise the update is added to y in place, and its input gradient accumulated into
      dx in place.

    ``xd`` is None when the adapter sees x itself (no dropout); passing x twice instead would
    make torch.compile break the graph here ("duplicate tensor input").
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scaling, fold):
        ctx.shared = xd is None
        if ctx.shared:
            xd = x
        n, r, k = lora_a.shape
        t = x.shape[0]
        ht = torch.bmm(lora_a, xd.reshape(t, n, k).permute(1, 2, 0))  # (n, r, T)
        if fold:
            w = torch.addmm(weight, _block_diag(lora_b), _block_diag(lora_a), alpha=scaling)
            y = F.linear(x, w, bias)
        else:
            y = F.linear(x, weight, bias)
            y.addmm_(ht.view(n * r, t).t(), _block_diag(lora_b).t(), alpha=scaling)
        ctx.fold = fold
        ctx.scaling = scaling
        ctx.save_for_backward(xd, weight, lora_a, lora_b, ht)
        return y

    @staticmethod
    def backward(ctx, g):
        xd, weight, lora_a, lora_b, ht = ctx.saved_tensors
        s = ctx.scaling
        n, r, k = lora_a.shape
        o = lora_b.shape[1]
        t = g.shape[0]
        gs = g.reshape(t, n, o)
        ght = torch.bmm(lora_b.transpose(1, 2).contiguous(), gs.permute(1, 2, 0))  # (n, r, T)
        gx = gxd = None
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                gx = g @ torch.addmm(weight, _block_diag(lora_b), _block_diag(lora_a), alpha=s)
            else:
                gx = g @ weight
                if ctx.shared:
                    gx.addmm_(ght.view(n * r, t).t(), _block_diag(lora_a), alpha=s)
        if not ctx.shared and ctx.needs_input_grad[1]:
            gxd = (ght.view(n * r, t).t() @ _block_diag(lora_a)) * s
        ga = gb = None
        if ctx.needs_input_grad[4]:
            ga = torch.bmm(ght, xd.reshape(t, n, k).transpose(0, 1)) * s  # (n, r, k)
        if ctx.needs_input_grad[5]:
            gb = torch.bmm(ht, gs.transpose(0, 1)).transpose(1, 2) * s  # (n, o, r)
        return gx, gxd, None, None, ga, gb, None, None


class _MELoRAFusedCPU(torch.autograd.Function):
    """The same function as :class:`_MELoRAFunction` for fp32 and bf16 on CPU, with the
    adapter's passes fused into the C++ kernels of :mod:`melora_lit.adapter.cpu_kernels`, dropout
    included. x, weight and bias are in the activations' dtype, the factors in fp32.

    The big GEMMs stay with BLAS (on the folded weight when ``fold``); the adapter then
    costs one pass over the rows of x in the forward (none when folded) and one pass over
    the rows of x and g in the backward. The dropout mask is a hash of a seed drawn from
    torch's generator (so ``torch.manual_seed`` and saved RNG states still fix it) and is
    regenerated in the backward, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, fold):
        ops = torch.ops.melora_lit
        seed = int(torch.randint(0, 2**62, ())) if p > 0 else 0
        if fold:
            y = F.linear(x, ops.fold(weight, lora_a, lora_b, scaling), bias)
        else:
            y = F.linear(x, weight, bias)
            ops.fwd_update_(y, x, lora_a, lora_b, scaling, p, seed)
        ctx.scaling, ctx.p, ctx.seed, ctx.fold = scaling, p, seed, fold
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        ops, s = torch.ops.melora_lit, ctx.scaling
        g = g.contiguous()
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ (ops.fold(weight, lora_a, lora_b, s) if ctx.fold else weight)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or (gx is not None and not ctx.fold):
            ga, gb = ops.bwd(x, g, lora_a, lora_b, s, ctx.p, ctx.seed, None if ctx.fold else gx)
        return gx, None, None, ga, gb, None, None, None


class MELoRALinear(nn.Module):
    """A frozen linear layer plus n mini LoRAs on a block diagonal.

    Args:
        base: the ``nn.Linear`` (or transformers ``Conv1D``) to adapt; it is frozen.
        r: rank of each mini LoRA.
        n: number of mini LoRAs; must divide both feature sizes.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the input of the adapter.
        init: ``"kaiming"`` (Kaiming-uniform A per block, as the paper's code) or
            ``"gaussian"`` (A ~ N(0, 1/r)). B starts at zero either way.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 1,
        n: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: Literal["kaiming", "gaussian"] = "kaiming",
    ) -> None:
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"MELoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        d_in, d_out = _features(base)
        _check_hparams("<layer>", r, n, alpha, dropout)
        _check_shape("<layer>", d_in, d_out, r, n)
        self.base = base
        self.base.requires_grad_(False)
        self.d_in, self.d_out, self.r, self.n = d_in, d_out, r, n
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in // n, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(n, d_out // n, r, device=w.device, dtype=w.dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: Literal["kaiming", "gaussian"] = "kaiming") -> None:
        if init == "kaiming":
            # per block, so that the fan-in is d_in/n as in the paper's separate nn.Linear A_i
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            raise ValueError(f"init={init!r} is not valid; use 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B)

    def dense_A(self) -> torch.Tensor:
        """blockdiag(A_1..A_n) of shape (n*r, d_in), differentiable, built without a loop."""
        n, r, k = self.lora_A.shape
        eye = torch.eye(n, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return torch.einsum("nrk,nm->nrmk", self.lora_A, eye).reshape(n * r, n * k)

    def dense_B(self) -> torch.Tensor:
        """blockdiag(B_1..B_n) of shape (d_out, n*r)."""
        n, o, r = self.lora_B.shape
        eye = torch.eye(n, device=self.lora_B.device, dtype=self.lora_B.dtype)
        return torch.einsum("nor,nm->nomr", self.lora_B, eye).reshape(n * o, n * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        weight = _dense_weight(self.base)
        if weight is None:  # an exotic base layer: stay generic, let autograd do the rest
            y = self.base(x)
            h = self.dropout(x).reshape(-1, self.d_in) @ self.dense_A().to(x.dtype).t()
            delta = (h @ self.dense_B().to(h.dtype).t()).view(*y.shape[:-1], self.d_out)
            return y + self.scaling * delta.to(y.dtype)
        # Run in the dtype the base runs in: under autocast that is the autocast dtype,
        # so cast once here and keep autocast out of the fused kernel.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            b = self.base.bias.to(dtype) if self.base.bias is not None else None
            x2 = x.to(dtype).reshape(-1, self.d_in)
            tokens, features = x2.shape[0], max(self.d_in, self.d_out)
            if (dev == "cpu" and dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()
                    and cpu_kernels.available()):
                drop = self.dropout
                p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
                # bf16 never folds: W + dW rounded to bf16 would lose the update's low bits
                fold = p == 0 and dtype == torch.float32 and tokens >= _FOLD_TOKENS_PER_FEATURE * features
                # the kernels take fp32 factors and compute in fp32 whatever the activations' dtype
                y = _MELoRAFusedCPU.apply(x2.contiguous(), w, b, self.lora_A.float(), self.lora_B.float(),
                                          self.scaling, p, fold)
                return y.view(*x.shape[:-1], self.d_out)
            xd = self.dropout(x2)
            xd2 = None if xd is x2 else xd
            # Fold the update into the weight only where that is both cheaper and as exact
            # as the unfolded sum. Cheaper: building W + s B'A' twice costs about as much as
            # four passes over a weight-sized matrix, the fold saves two passes over the
            # (tokens x features) activations; measured on CPU it wins at 4096 tokens for
            # d=768 and loses at d=4096, hence tokens >= 4 * features. Exact: fp32/fp64 only;
            # in bf16/fp16, rounding W + dW to 16 bits would add an error as large as the
            # output's own rounding, so low precision keeps the unfolded sum.
            fold = xd2 is None and dtype in (torch.float32, torch.float64) and tokens >= 4 * features
            y = _MELoRAFunction.apply(x2, xd2, w, b, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling, fold)
        return y.view(*x.shape[:-1], self.d_out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r)·blockdiag(B_i A_i), shape (d_out, d_in), in fp32."""
        blocks = torch.bmm(self.lora_B.float(), self.lora_A.float())  # (n, d_out/n, d_in/n)
        return torch.block_diag(*blocks) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (in fp32, cast once)."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if type(self.base.weight) is not nn.Parameter:  # quantized: merging dequantizes for good,
            from .quantize import dequantize_model  # re-quantizing would round the update away

            dequantize_model(self.base)
        w = self.base.weight
        d = delta.t() if _is_conv1d(self.base) else delta
        w.copy_((w.float() + d.to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, n={self.n}, r={self.r}, "
            f"alpha={self.alpha:g}, rank={self.n * self.r}, merged={self.merged}"
        )


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
        rank_pattern: per-module override of ``r``, ``{pattern: r}``; first match wins.
        n_pattern: per-module override of ``n``, ``{pattern: n}``; first match wins.
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
        for pat, v in {**self.rank_pattern, **self.n_pattern}.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"pattern {pat!r} sets {v!r}; overrides of r and n must be integers >= 1")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={self.init!r} is not valid; use 'kaiming' or 'gaussian'")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_hparams(where: str, r: int, n: int, alpha: float, dropout: float) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r={r!r} is not valid; r must be an integer >= 1")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n={n!r} is not valid; n must be an integer >= 1")
    if not alpha > 0:
        raise ValueError(f"{where}: alpha={alpha!r} is not valid; alpha must be > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"{where}: dropout={dropout!r} is not valid; dropout must be in [0, 1)")


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def _check_shape(name: str, d_in: int, d_out: int, r: int, n: int) -> None:
    if d_in % n or d_out % n:
        valid = _divisors(math.gcd(d_in, d_out))
        shown = ", ".join(map(str, valid[:16])) + (", ..." if len(valid) > 16 else "")
        raise ValueError(
            f"{name}: n={n} does not divide d_in={d_in} and d_out={d_out}; n must be one of {shown}"
        )
    if n * r > min(d_in, d_out):
        raise ValueError(
            f"{name}: n*r={n}*{r}={n * r} exceeds min(d_in, d_out)={min(d_in, d_out)}; "
            f"use r <= {min(d_in, d_out) // n} for n={n}"
        )


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _first_match(name: str, patterns: dict[str, int], default: int) -> int:
    for pat, value in patterns.items():
        if _matches(name, pat):
            return value
    return default


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out or name.split(".")[0] in _HEAD_NAMES:
            heads.add(name)
    return heads


def melora_layers(model: nn.Module) -> dict[str, MELoRALinear]:
    """All MELoRA layers of a model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MELoRALinear)}


@dataclass
class InjectionSummary:
    """What :func:`inject_melora` did: modules wrapped (with d_in, d_out, n, r and the
    equivalent rank n*r), adapter, saved-module, trainable and total parameter counts."""

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
    Raises ``ValueError`` with a one-line message on any invalid setting.
    """
    existing = melora_layers(model)
    if existing:
        raise ValueError(
            f"model already has {len(existing)} MELoRA layers (e.g. {next(iter(existing))}); "
            "merge_melora() it or start from a fresh model before injecting again"
        )
    heads = _head_names(model)
    all_linear = config.target_modules == "all-linear"
    targets = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    save_names = [
        name for name, _ in model.named_modules()
        if name and any(_matches(name, p) for p in config.modules_to_save)
    ]
    missing_save = [p for p in config.modules_to_save if not any(_matches(n, p) for n in save_names)]
    if missing_save:
        raise ValueError(f"modules_to_save {missing_save} matched no module; some that exist: {_some_names(model)}")
    # keep only outermost saved modules, so a parameter is saved once
    save_names = [n for n in save_names if not any(n.startswith(s + ".") for s in save_names)]

    def in_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in save_names)

    chosen = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or in_saved(name):
            continue
        if any(_matches(name, p) for p in config.exclude_modules):
            continue
        if all_linear:
            if name in heads or any(name.startswith(h + ".") for h in heads):
                continue
        elif not any(_matches(name, p) for p in targets):
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no linear layer; "
            f"some linear layers that exist: {_some_names(model, linear_only=True)}"
        )

    # validate everything before changing anything, so a bad setting leaves the model intact
    plan = {}
    for name in chosen:
        module = model.get_submodule(name)
        d_in, d_out = _features(module)
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
    model._melora_config = config  # type: ignore[attr-defined]
    model._melora_modules_to_save = save_names  # type: ignore[attr-defined]

    adapter = sum(p.numel() for m in melora_layers(model).values() for p in (m.lora_A, m.lora_B))
    return InjectionSummary(
        modules=modules,
        modules_to_save=save_names,
        adapter_params=adapter,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def _some_names(model: nn.Module, linear_only: bool = False, k: int = 8) -> str:
    names = [n for n, m in model.named_modules() if n and (not linear_only or _is_linear(m))]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return ", ".join(leaves[:k]) + (", ..." if len(leaves) > k else "")


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
    for attr in ("_melora_config", "_melora_modules_to_save"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _adapter_keys(model: nn.Module) -> list[str]:
    saved = getattr(model, "_melora_modules_to_save", [])
    keys = []
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B") and isinstance(model.get_submodule(module), MELoRALinear):
            keys.append(key)
        elif any(key.startswith(s + ".") for s in saved):
            keys.append(key)
    return keys


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights and the ``modules_to_save`` tensors, keyed as in the model."""
    full = model.state_dict()
    return {k: full[k] for k in _adapter_keys(model)}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter (and saved-module) tensors into a model that has MELoRA injected.

    Raises ``ValueError`` naming the first missing or unexpected key or shape mismatch.
    """
    expected = adapter_state_dict(model)
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
