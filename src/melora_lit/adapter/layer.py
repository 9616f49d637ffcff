r"""MELoRALinear: a frozen linear layer plus n mini LoRAs on a block diagonal
(MELoRA, Ren et al., ACL 2024).

A frozen weight W (d_out x d_in) gets n mini LoRAs, each on its own contiguous slice of the
input and of the output features::

    y = W x + b + (alpha / r) * blockdiag(B_1 A_1, ..., B_n A_n) x

                 d_in/n     d_in/n           d_in/n
              +----------+----------+-----+----------+
      d_out/n |  B_1 A_1 |    0     | ... |    0     |      A_i: r x d_in/n   (lora_A[i])
              +----------+----------+-----+----------+      B_i: d_out/n x r  (lora_B[i])
      d_out/n |    0     |  B_2 A_2 | ... |    0     |
              +----------+----------+-----+----------+      B_i starts at zero, so the
              |   ...    |   ...    | ... |   ...    |      layer starts as W.
              +----------+----------+-----+----------+
      d_out/n |    0     |    0     | ... |  B_n A_n |
              +----------+----------+-----+----------+

The update has rank n*r for the parameters of one rank-r LoRA; n = 1 is plain LoRA. The same
matrix is ``blockdiag(B_1..B_n) @ blockdiag(A_1..A_n)`` (:func:`block_diagonal` builds those),
which is how :meth:`MELoRALinear.reference_forward` computes it and how a PEFT export
(:func:`melora_lit.adapter.io.export_peft_lora`) stores it.

Three implementations of the one function, chosen per forward by
:meth:`MELoRALinear._choose_path`:

* ``reference``: :meth:`MELoRALinear.reference_forward`, the formula as written, autograd for
  the backward. For base layers the fast paths cannot hand to a GEMM.
* ``fused_cpu``: :class:`_MELoRAFusedCPU`, the C++ kernels of
  :mod:`melora_lit.adapter.cpu_kernels` (fp32 and bf16 on CPU, dropout inside).
* ``torch``: :class:`_MELoRAFunction`, plain torch with a hand-written backward (everywhere
  else, under ``torch.compile``, and where the kernels cannot be built).

Torch only: no Lightning, no transformers import.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

__all__ = ["MELoRALinear", "block_diagonal"]

ForwardPath = Literal["reference", "fused_cpu", "torch"]


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
    """The (d_out, d_in) weight of a plain Linear or Conv1D, which the fast paths hand to a GEMM
    as is; None for anything else (a subclass of nn.Linear, a base whose weight is not a plain
    tensor, e.g. a quantized one), which then takes the reference path."""
    if type(module) is nn.Linear and type(module.weight) is nn.Parameter:
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    return None


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(n, p, q) -> the (n*p, n*q) block-diagonal matrix of its n blocks, without a loop.

    Differentiable; the one builder of blockdiag(A_1..A_n), blockdiag(B_1..B_n) and of the
    dense update.
    """
    n, p, q = blocks.shape
    out = blocks.new_zeros(n, p, n, q)
    out.diagonal(dim1=0, dim2=2).copy_(blocks.permute(1, 2, 0))
    return out.view(n * p, n * q)


# Folding the update into the weight, y = x (W + s B'A')^T + b and dx = g (W + s B'A'), instead
# of adding it to the activations: building W + s B'A' (in the forward and again in the
# backward, never saved) costs about four passes over a weight-sized matrix and saves two
# passes over the (tokens x features) activations. Measured on CPU (docs/benchmarks.md,
# `bench_layer.py --fold`) it wins from about this many tokens per feature on: at 4096 tokens
# for d=768, not at d=4096.
_FOLD_TOKENS_PER_FEATURE = 4


def _should_fold(tokens: int, features: int, dtype: torch.dtype, dropout_active: bool) -> bool:
    """Fold only where that is both cheaper and as exact as the unfolded sum: enough tokens
    (above), fp32/fp64 (rounding W + dW to bf16/fp16 would add an error as large as the output's
    own rounding and lose the update's low bits), and no dropout (the adapter then sees another
    input than W does)."""
    return (not dropout_active and dtype in (torch.float32, torch.float64)
            and tokens >= _FOLD_TOKENS_PER_FEATURE * features)


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
    * With ``fold`` (see :func:`_should_fold`) the update is folded into the weight for the two
      big GEMMs, so the adapter adds no pass over y or dx at all.
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
            w = torch.addmm(weight, block_diagonal(lora_b), block_diagonal(lora_a), alpha=scaling)
            y = F.linear(x, w, bias)
        else:
            y = F.linear(x, weight, bias)
            y.addmm_(ht.view(n * r, t).t(), block_diagonal(lora_b).t(), alpha=scaling)
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
                gx = g @ torch.addmm(weight, block_diagonal(lora_b), block_diagonal(lora_a), alpha=s)
            else:
                gx = g @ weight
                if ctx.shared:
                    gx.addmm_(ght.view(n * r, t).t(), block_diagonal(lora_a), alpha=s)
        if not ctx.shared and ctx.needs_input_grad[1]:
            gxd = (ght.view(n * r, t).t() @ block_diagonal(lora_a)) * s
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
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={init!r} is not valid; use 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.lora_B)
        if self.lora_A.is_meta:  # materialized later, and reset then
            return
        # A is drawn by the CPU generator wherever the layer lives (the CUDA generator draws
        # other numbers for the same seed): a model injected on a GPU starts from the adapters
        # the same model injected on the CPU starts from
        A = self.lora_A if self.lora_A.device.type == "cpu" else torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        if init == "kaiming":
            # per block, so that the fan-in is d_in/n as in the paper's separate nn.Linear A_i
            for a in A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / self.r)
        if A is not self.lora_A:
            self.lora_A.copy_(A)

    def dense_A(self) -> torch.Tensor:
        """blockdiag(A_1..A_n) of shape (n*r, d_in), differentiable."""
        return block_diagonal(self.lora_A)

    def dense_B(self) -> torch.Tensor:
        """blockdiag(B_1..B_n) of shape (d_out, n*r), differentiable."""
        return block_diagonal(self.lora_B)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r)·blockdiag(B_i A_i), shape (d_out, d_in), in fp32."""
        return block_diagonal(torch.bmm(self.lora_B.float(), self.lora_A.float())) * self.scaling

    # ------------------------------------------------------------------------- forward
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The formula as written: base(x) + (alpha/r) · dropout(x) A'^T B'^T, with A' and B' the
        block-diagonal factors; autograd does the backward. The fast paths compute the same."""
        y = self.base(x)
        h = self.dropout(x).reshape(-1, self.d_in) @ self.dense_A().to(x.dtype).t()
        delta = (h @ self.dense_B().to(h.dtype).t()).view(*y.shape[:-1], self.d_out)
        return y + self.scaling * delta.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # Run in the dtype the base runs in: under autocast that is the autocast dtype, so the
        # fast paths cast once here and keep autocast out of their Functions.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        path = self._choose_path(dev, dtype)
        if path == "reference":
            return self.reference_forward(x)
        with torch.autocast(dev, enabled=False):
            y = self._fast_forward(x.to(dtype).reshape(-1, self.d_in), dtype, fused=path == "fused_cpu")
        return y.view(*x.shape[:-1], self.d_out)

    def _choose_path(self, device_type: str, dtype: torch.dtype) -> ForwardPath:
        """Which implementation runs this forward (see the module docstring)."""
        if _dense_weight(self.base) is None:  # e.g. a quantized base: see _dense_weight
            return "reference"
        # The kernels are an opaque op to torch.compile, which traces the torch path instead;
        # available() comes last: it builds the kernels on its first call.
        if (device_type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and not torch.compiler.is_compiling() and cpu_kernels.available()):
            return "fused_cpu"
        return "torch"

    def _fast_forward(self, x2: torch.Tensor, dtype: torch.dtype, fused: bool) -> torch.Tensor:
        """The fused CPU or torch path on x flattened to (tokens, d_in) in the compute dtype."""
        w = _dense_weight(self.base).to(dtype)
        b = self.base.bias.to(dtype) if self.base.bias is not None else None
        tokens, features = x2.shape[0], max(self.d_in, self.d_out)
        if fused:
            drop = self.dropout
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            fold = _should_fold(tokens, features, dtype, dropout_active=p > 0)
            # the kernels take fp32 factors and compute in fp32 whatever the activations' dtype
            return _MELoRAFusedCPU.apply(x2.contiguous(), w, b, self.lora_A.float(), self.lora_B.float(),
                                         self.scaling, p, fold)
        xd = self.dropout(x2)
        xd2 = None if xd is x2 else xd
        fold = _should_fold(tokens, features, dtype, dropout_active=xd2 is not None)
        return _MELoRAFunction.apply(x2, xd2, w, b, self.lora_A.to(dtype), self.lora_B.to(dtype),
                                     self.scaling, fold)

    # ------------------------------------------------------------------------- merge
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
