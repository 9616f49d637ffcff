"""What a MELoRA adapter has learned, from its factors alone: torch only (no Lightning).

For a layer with n mini LoRAs the update is ΔW = s · blockdiag(B_1 A_1, …, B_n A_n), s = alpha/r,
A_i (r × d_in/n), B_i (d_out/n × r). Everything here works on the factors and on r × r matrices;
neither ΔW (d_out × d_in) nor a block B_i A_i (d_out/n × d_in/n) is ever built:

* the singular values of B_i A_i are those of the r × r matrix R_B R_A^T, with B_i = Q_B R_B and
  A_i^T = Q_A R_A (reduced QR; the Q's have orthonormal columns), batched over the n blocks;
* ‖ΔW‖_F = s · sqrt(Σ_i Σ_j σ_ij²);
* ⟨B_i A_i, B_j A_j⟩_F = Σ (B_i^T B_j) ∘ (A_i A_j^T), from r × r Gram products.

Computed in float64 (float32 where the device has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AdapterDiagnostics", "block_singular_values", "block_ranks", "block_cosine_similarity",
           "adapter_diagnostics"]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _check(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[int, int, int, int]:
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} are not MELoRA factors "
                         "of shapes (n, r, d_in/n) and (n, d_out/n, r)")
    n, r, k = lora_a.shape
    return n, r, k, lora_b.shape[1]


@torch.no_grad()
def block_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Singular values of each block B_i A_i, shape (n, min(r, d_out/n, d_in/n)), descending,
    in float64, without forming the blocks."""
    _check(lora_a, lora_b)
    dt = _work_dtype(lora_a)
    _, r_b = torch.linalg.qr(lora_b.to(dt))  # (n, min(o, r), r)
    _, r_a = torch.linalg.qr(lora_a.to(dt).transpose(1, 2))  # (n, min(k, r), r)
    return torch.linalg.svdvals(r_b @ r_a.transpose(1, 2))


def block_ranks(singular_values: torch.Tensor, block_shape: tuple[int, int],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Numerical rank of each block from its singular values, shape (n,), int64.

    The tolerance is that of ``torch.linalg.matrix_rank`` on the dense block stored in ``dtype``
    (the parameters' dtype): a singular value counts when it is above
    σ_max · max(d_out/n, d_in/n) · eps(dtype). An all-zero block has rank 0.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    tol = singular_values[:, :1] * (max(block_shape) * eps)
    return (singular_values > tol).sum(dim=1)


@torch.no_grad()
def block_cosine_similarity(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float | None:
    """Mean pairwise cosine similarity of the flattened blocks B_i A_i (i < j).

    1 means the mini LoRAs all learned the same update (no diversity), 0 unrelated updates.
    Pairs with an all-zero block are left out; None when no pair is left (n = 1, or B = 0 as at
    initialisation).
    """
    n, r, _, _ = _check(lora_a, lora_b)
    if n < 2:
        return None
    dt = _work_dtype(lora_a)
    a = lora_a.to(dt)
    b = lora_b.to(dt)
    # Gram products of all block pairs: (n, n, r, r) each, never a d_out/n x d_in/n block
    gb = torch.einsum("ioa,job->ijab", b, b)
    ga = torch.einsum("iak,jbk->ijab", a, a)
    inner = (gb * ga).sum(dim=(-1, -2))  # <B_i A_i, B_j A_j>_F, (n, n)
    sq = inner.diagonal().clamp(min=0)
    norms = sq.sqrt()
    iu = torch.triu_indices(n, n, offset=1, device=inner.device)
    ni, nj = norms[iu[0]], norms[iu[1]]
    keep = (ni > 0) & (nj > 0)
    if not bool(keep.any()):
        return None
    cos = inner[iu[0], iu[1]][keep] / (ni[keep] * nj[keep])
    return float(cos.clamp(-1, 1).mean())


@dataclass
class AdapterDiagnostics:
    """Diagnostics of one MELoRA layer (see :func:`adapter_diagnostics`)."""

    delta_norm: float  # ‖ΔW‖_F, scaling included
    rank: int  # Σ_i numerical rank of B_i A_i (at most n·r)
    max_rank: int  # n·r
    block_ranks: list[int]
    block_cos_sim: float | None  # mean pairwise cosine similarity of the blocks; None for n = 1


@torch.no_grad()
def adapter_diagnostics(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> AdapterDiagnostics:
    """‖ΔW‖_F of ΔW = scaling · blockdiag(B_i A_i), its rank reached (the sum over the blocks of
    their numerical rank, see :func:`block_ranks`) and the mean pairwise cosine similarity of
    the blocks (:func:`block_cosine_similarity`), from the factors ``lora_A`` (n, r, d_in/n) and
    ``lora_B`` (n, d_out/n, r) of a :class:`~melora_lit.adapter.MELoRALinear`.
    """
    n, r, k, o = _check(lora_a, lora_b)
    sv = block_singular_values(lora_a, lora_b)
    ranks = block_ranks(sv, (o, k), lora_a.dtype)
    norm = abs(float(scaling)) * math.sqrt(float(sv.square().sum()))
    return AdapterDiagnostics(
        delta_norm=norm,
        rank=int(ranks.sum()),
        max_rank=n * r,
        block_ranks=[int(x) for x in ranks],
        block_cos_sim=block_cosine_similarity(lora_a, lora_b),
    )
