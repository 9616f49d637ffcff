"""A fused Triton candidate for MELoRALinear's adapter passes on the GPU (no dropout): measured by
``gpu_check.py`` beside the plain-torch path, not used by melora_lit until it wins there.

The frozen GEMMs stay with cuBLAS (``y = x W^T + b``, ``dx = g W``); the adapter's work is two
kernels, each one pass over the activations, grid (token blocks, n blocks)::

    forward   h = A_i x_i          (BT x r per program, fp32, kept for the backward)
              y_i += s * h B_i^T   (y read and written once)
    backward  u = g_i B_i          (BT x r)
              dx_i += s * u A_i    (dx read and written once)
              dA_i += s * u^T x_i, dB_i += s * g_i^T h   (per-program partial sums, added after)

where the plain-torch path makes four batched products with r-row operands (GEMV-shaped for
r = 1) and two in-place GEMM updates. The per-block products are broadcast FMAs and sums in
fp32 (r is small: no tensor-core tile shape fits), the partial sums make the factor
gradients deterministic (no atomics).

Tested on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_triton_melora.py)
against float64 block-diagonal references; its speed is the GPU check's to measure.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_RANK = 16  # the per-block loops over r are unrolled


@triton.jit
def _forward_kernel(x_ptr, a_ptr, b_ptr, y_ptr, h_ptr, T, scaling,
                    N: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr, O: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr):
    pid_t = tl.program_id(0)
    i = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    in_rows = rows < T
    ranks = tl.arange(0, RP)  # r padded to a power of two; the padding rows of A and B load as 0
    in_ranks = ranks < R
    # h = x_i A_i^T: one pass over this block's slice of x
    h = tl.zeros([BT, RP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        in_cols = cols < K
        x = tl.load(x_ptr + rows[:, None] * (N * K) + i * K + cols[None, :],
                    mask=in_rows[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (i * R + ranks[:, None]) * K + cols[None, :],
                    mask=in_ranks[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (RP, BK)
        h += tl.sum(x[:, None, :] * a[None, :, :], axis=2)
    tl.store(h_ptr + rows[:, None] * (N * R) + i * R + ranks[None, :], h,
             mask=in_rows[:, None] & in_ranks[None, :])
    # y_i += s h B_i^T: one read and one write of this block's slice of y
    for o0 in range(0, O, BO):
        cols = o0 + tl.arange(0, BO)
        in_cols = cols < O
        bt = tl.load(b_ptr + (i * O + cols[None, :]) * R + ranks[:, None],
                     mask=in_ranks[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (RP, BO) = B_i^T
        upd = tl.sum(h[:, :, None] * bt[None, :, :], axis=1)
        ptrs = y_ptr + rows[:, None] * (N * O) + i * O + cols[None, :]
        mask = in_rows[:, None] & in_cols[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + scaling * upd).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, a_ptr, b_ptr, h_ptr, gx_ptr, pa_ptr, pb_ptr, T, scaling,
                     N: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr, O: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr, UPDATE_GX: tl.constexpr):
    pid_t = tl.program_id(0)
    i = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    in_rows = rows < T
    ranks = tl.arange(0, RP)
    in_ranks = ranks < R
    h = tl.load(h_ptr + rows[:, None] * (N * R) + i * R + ranks[None, :],
                mask=in_rows[:, None] & in_ranks[None, :], other=0.0)  # (BT, RP)
    # one pass over g_i: u = g_i B_i, and this program's part of dB_i = s g_i^T h
    u = tl.zeros([BT, RP], dtype=tl.float32)
    for o0 in range(0, O, BO):
        cols = o0 + tl.arange(0, BO)
        in_cols = cols < O
        g = tl.load(g_ptr + rows[:, None] * (N * O) + i * O + cols[None, :],
                    mask=in_rows[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (BT, BO)
        bt = tl.load(b_ptr + (i * O + cols[None, :]) * R + ranks[:, None],
                     mask=in_ranks[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (RP, BO)
        u += tl.sum(g[:, None, :] * bt[None, :, :], axis=2)
        part_b = tl.sum(g[:, :, None] * h[:, None, :], axis=0)  # (BO, RP)
        tl.store(pb_ptr + ((pid_t * N + i) * O + cols[:, None]) * R + ranks[None, :], scaling * part_b,
                 mask=in_cols[:, None] & in_ranks[None, :])
    # one pass over x_i (and dx_i): dx_i += s u A_i, and this program's part of dA_i = s u^T x_i
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        in_cols = cols < K
        mask = in_rows[:, None] & in_cols[None, :]
        x = tl.load(x_ptr + rows[:, None] * (N * K) + i * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (i * R + ranks[:, None]) * K + cols[None, :],
                    mask=in_ranks[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (RP, BK)
        part_a = tl.sum(u[:, :, None] * x[:, None, :], axis=0)  # (RP, BK)
        tl.store(pa_ptr + ((pid_t * N + i) * R + ranks[:, None]) * K + cols[None, :], scaling * part_a,
                 mask=in_ranks[:, None] & in_cols[None, :])
        if UPDATE_GX:
            ptrs = gx_ptr + rows[:, None] * (N * K) + i * K + cols[None, :]
            gx = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            upd = tl.sum(u[:, :, None] * a[None, :, :], axis=1)
            tl.store(ptrs, (gx + scaling * upd).to(gx_ptr.dtype.element_ty), mask=mask)


BLOCKS = {"BT": 32, "BK": 32, "BO": 32}  # the (BT, r, BK) products stay in registers for r <= 16


class MELoRATritonFunction(torch.autograd.Function):
    """y = x W^T + b + s blockdiag(B_i A_i) x for 2-D contiguous x, without dropout."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        n, r, k = lora_a.shape
        o = lora_b.shape[1]
        t = x.shape[0]
        y = torch.nn.functional.linear(x, weight, bias).contiguous()
        h = torch.empty(t, n, r, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(t, BLOCKS["BT"]), n)
        _forward_kernel[grid](x, lora_a.contiguous(), lora_b.contiguous(), y, h, t, float(scaling),
                              N=n, R=r, RP=triton.next_power_of_2(r), K=k, O=o, **BLOCKS)
        ctx.scaling = float(scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        n, r, k = lora_a.shape
        o = lora_b.shape[1]
        t = x.shape[0]
        g = g.contiguous()
        update_gx = ctx.needs_input_grad[0]
        gx = (g @ weight).contiguous() if update_gx else g  # g: a placeholder the kernel never touches
        grid = (triton.cdiv(t, BLOCKS["BT"]), n)
        pa = torch.empty(grid[0], n, r, k, device=x.device, dtype=torch.float32)
        pb = torch.empty(grid[0], n, o, r, device=x.device, dtype=torch.float32)
        _backward_kernel[grid](g, x, lora_a.contiguous(), lora_b.contiguous(), h, gx, pa, pb, t, ctx.scaling,
                               N=n, R=r, RP=triton.next_power_of_2(r), K=k, O=o, UPDATE_GX=update_gx,
                               **BLOCKS)
        ga = pa.sum(0).to(lora_a.dtype)
        gb = pb.sum(0).to(lora_b.dtype)
        return (gx if update_gx else None), None, None, ga, gb, None


def supported(layer) -> bool:
    """Whether :func:`triton_forward` computes this MELoRALinear's function: a plain
    ``nn.Linear`` base, no active dropout, r at most :data:`MAX_RANK`, not merged."""
    return (type(layer.base) is torch.nn.Linear and layer.r <= MAX_RANK and not layer.merged
            and not (layer.training and isinstance(layer.dropout, torch.nn.Dropout) and layer.dropout.p > 0))


def triton_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through the Triton kernels (any leading dims)."""
    lead = x.shape[:-1]
    y = MELoRATritonFunction.apply(x.reshape(-1, x.shape[-1]).contiguous(), layer.base.weight, layer.base.bias,
                                   layer.lora_A, layer.lora_B, layer.scaling)
    return y.view(*lead, y.shape[-1])


class TritonMELoRA(torch.nn.Module):
    """A MELoRALinear run through :func:`triton_forward` (for the benchmarks)."""

    def __init__(self, layer) -> None:
        super().__init__()
        if not supported(layer):
            raise ValueError("the Triton candidate needs a plain nn.Linear base, no dropout and r <= 16")
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triton_forward(self.layer, x)
