"""MELoRALinear against independent references.

Every check compares the layer with something built here from the stored factors only:
a dense block-diagonal update made with ``torch.block_diag``, a per-block Python loop, or
PEFT's own LoRA layer. The fused autograd Function is never checked against itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from melora_lit import MELoRAConfig, MELoRALinear, inject_melora, melora_layers
from melora_lit.adapter import cpu_kernels
from support import dense_delta

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def path(request):
    """Every test runs on both fp32 CPU paths: the fused C++ kernels and plain torch."""
    if request.param == "kernels":
        if not cpu_kernels.available():
            pytest.skip("CPU kernels unavailable here (test_cpu_kernels.py says why)")
        yield request.param
    else:
        with cpu_kernels.disabled():
            yield request.param


# --------------------------------------------------------------------------- helpers


def conv1d(d_in: int, d_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(d_out, d_in)  # Conv1D(nf=d_out, nx=d_in), weight (d_in, d_out)
    nn.init.normal_(m.weight, std=0.2)
    nn.init.normal_(m.bias, std=0.2)
    return m


def linear(d_in: int, d_out: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias, dtype=dtype)


def make_layer(d_in, d_out, n, r, alpha=4.0, dropout=0.0, base="linear", bias=True, seed=0,
               dtype=torch.float32) -> MELoRALinear:
    torch.manual_seed(seed)
    b = conv1d(d_in, d_out) if base == "conv1d" else linear(d_in, d_out, bias, dtype)
    layer = MELoRALinear(b, r=r, n=n, alpha=alpha, dropout=dropout)
    with torch.no_grad():  # B starts at zero; make the update visible
        layer.lora_B.normal_(std=0.5)
    return layer


def base_wb(layer: MELoRALinear):
    """(W (d_out, d_in), b) of the base layer, read from the base module directly."""
    base = layer.base
    if type(base).__name__ == "Conv1D":
        return base.weight.detach().t(), base.bias.detach()
    return base.weight.detach(), (base.bias.detach() if base.bias is not None else None)


def scale(layer) -> float:
    """alpha / r from the layer's alpha and the stored A's rank (not the layer's ``scaling``)."""
    return layer.alpha / layer.lora_A.shape[1]


def ref_dense(layer, x, A, B, xd=None, dtype=torch.float64):
    """base(x) + dense ΔW · xd, all in ``dtype`` (float64 by default)."""
    W, b = base_wb(layer)
    W = W.to(dtype)
    xd = x if xd is None else xd
    y = x.to(dtype) @ W.t()
    if b is not None:
        y = y + b.to(dtype)
    return y + xd.to(dtype) @ dense_delta(A.to(dtype), B.to(dtype), scale(layer)).t()


def ref_loop(layer, x, xd=None):
    """The paper's formulation: n separate small LoRAs on the input slices, concatenated."""
    n, r, k = layer.lora_A.shape
    xd = x if xd is None else xd
    W, b = base_wb(layer)
    outs = []
    for i in range(n):
        xi = xd[..., i * k:(i + 1) * k].double()
        outs.append(xi @ layer.lora_A[i].detach().double().t() @ layer.lora_B[i].detach().double().t())
    y = x.double() @ W.double().t() + (b.double() if b is not None else 0)
    return y + scale(layer) * torch.cat(outs, dim=-1)


def close(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """|a - ref| <= tol * max(1, max|ref|) everywhere: fp32 round-off grows with the
    magnitude of sums over many tokens, an error in the method shows at any scale."""
    bound = tol * max(1.0, float(ref.abs().max()))
    err = float((a.double() - ref.double()).abs().max())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


SHAPES = [  # (d_in, d_out, n, r)
    (32, 32, 4, 2),
    (48, 24, 8, 1),
    (24, 48, 3, 2),
    (64, 16, 16, 1),
    (16, 64, 1, 4),
    (30, 45, 5, 3),
]
# 7..24 tokens: fewer tokens than features (the update is added to y in place);
# 280 tokens: >= 4x the features, where fp32 folds the update into the weight
LEADING = [(7,), (3, 5), (2, 3, 4), (4, 70)]


# --------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_block_diag_and_loop(shape, lead):
    d_in, d_out, n, r = shape
    layer = make_layer(d_in, d_out, n, r)
    x = torch.randn(*lead, d_in)
    y = layer(x)
    assert y.shape == (*lead, d_out) and y.dtype == torch.float32
    ref = ref_dense(layer, x, layer.lora_A.detach(), layer.lora_B.detach())
    close(y.double(), ref)
    close(y.double(), ref_loop(layer, x))
    # the update is really there (B is non-zero), so the comparison is not vacuous
    assert (y - layer.base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("tokens", [6, 300])
def test_non_contiguous_input_and_one_feature_blocks(tokens):
    """A transposed (non-contiguous) input, and n = d_in (blocks of one input feature)."""
    layer = make_layer(32, 64, 32, 1)
    x = torch.randn(32, tokens).t().requires_grad_()
    assert not x.is_contiguous()
    g = torch.randn(tokens, 64)
    y = layer(x)
    y.backward(g)
    x_ref = x.detach().double().requires_grad_()
    A_ref = layer.lora_A.detach().double().requires_grad_()
    B_ref = layer.lora_B.detach().double().requires_grad_()
    ref = ref_dense(layer, x_ref, A_ref, B_ref)
    close(y.detach(), ref.detach())
    ref.backward(g.double())
    close(x.grad, x_ref.grad)
    close(layer.lora_A.grad, A_ref.grad)
    close(layer.lora_B.grad, B_ref.grad)


@pytest.mark.parametrize("base", ["linear", "conv1d", "linear-nobias"])
@pytest.mark.parametrize("lead", LEADING, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_dense_reference(shape, lead, base):
    d_in, d_out, n, r = shape
    layer = make_layer(d_in, d_out, n, r, base="conv1d" if base == "conv1d" else "linear",
                       bias=base != "linear-nobias")
    x = torch.randn(*lead, d_in, requires_grad=True)
    g = torch.randn(*lead, d_out)
    layer(x).backward(g)

    x_ref = x.detach().double().requires_grad_()
    A_ref = layer.lora_A.detach().double().requires_grad_()
    B_ref = layer.lora_B.detach().double().requires_grad_()
    ref_dense(layer, x_ref, A_ref, B_ref).backward(g.double())

    close(x.grad.double(), x_ref.grad)
    close(layer.lora_A.grad.double(), A_ref.grad)
    close(layer.lora_B.grad.double(), B_ref.grad)
    # the frozen base gets nothing
    assert all(p.grad is None for p in layer.base.parameters())
    assert A_ref.grad.abs().max() > 0 and B_ref.grad.abs().max() > 0


def test_gradients_without_input_grad():
    """x not requiring grad (first layer of a frozen net): only A and B get gradients."""
    layer = make_layer(32, 16, 4, 2)
    x = torch.randn(5, 32)
    g = torch.randn(5, 16)
    layer(x).backward(g)
    A_ref = layer.lora_A.detach().double().requires_grad_()
    B_ref = layer.lora_B.detach().double().requires_grad_()
    ref_dense(layer, x, A_ref, B_ref).backward(g.double())
    close(layer.lora_A.grad.double(), A_ref.grad)
    close(layer.lora_B.grad.double(), B_ref.grad)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize("lead", [(9,), (3, 6)], ids=lambda s: "x".join(map(str, s)))
def test_dropout_forward_and_backward(base, lead, path):
    """With p=0.5 the adapter sees dropout(x) and the base sees x; same mask via the seed."""
    d_in, d_out, n, r, p = 32, 48, 4, 2, 0.5
    layer = make_layer(d_in, d_out, n, r, dropout=p, base=base)
    layer.train()
    x = torch.randn(*lead, d_in, requires_grad=True)
    g = torch.randn(*lead, d_out)

    torch.manual_seed(123)
    y = layer(x)
    y.backward(g)

    torch.manual_seed(123)  # the same RNG draw as the layer's
    if path == "kernels":  # one seed drawn per call; the mask is a hash of (seed, token, column)
        seed = int(torch.randint(0, 2**62, ()))
        mask = torch.ops.melora_lit.dropout_mask(seed, x[..., 0].numel(), d_in, p).view(x.shape)
        xd = x.detach() * mask
    else:
        xd = F.dropout(x.detach(), p=p, training=True)
    assert (xd == 0).any() and (xd != 0).any()
    x_ref = x.detach().double().requires_grad_()
    A_ref = layer.lora_A.detach().double().requires_grad_()
    B_ref = layer.lora_B.detach().double().requires_grad_()
    mask = (xd != 0).double() / (1 - p)
    ref = ref_dense(layer, x_ref, A_ref, B_ref, xd=x_ref * mask)
    close(y.double(), ref)
    close(y.detach().double(), ref_loop(layer, x.detach(), xd=xd))
    ref.backward(g.double())
    close(x.grad.double(), x_ref.grad)
    close(layer.lora_A.grad.double(), A_ref.grad)
    close(layer.lora_B.grad.double(), B_ref.grad)

    # without dropout the result differs: the mask was really applied
    no_drop = ref_dense(layer, x.detach(), layer.lora_A.detach(), layer.lora_B.detach())
    assert (y.detach().double() - no_drop).abs().max() > 1e-3
    # eval mode: dropout off, deterministic and equal to the no-dropout reference
    layer.eval()
    close(layer(x.detach()).double(), no_drop)


def test_conv1d_forward_matches_reference():
    """GPT-2 style Conv1D base (weight stored (d_in, d_out))."""
    layer = make_layer(24, 72, 6, 2, base="conv1d")
    assert layer.base.weight.shape == (24, 72)
    x = torch.randn(2, 5, 24)
    W = layer.base.weight.detach().double()  # (d_in, d_out): y = x W + b
    dW = dense_delta(layer.lora_A.detach().double(), layer.lora_B.detach().double(), 4.0 / 2)
    ref = x.double() @ W + layer.base.bias.detach().double() + x.double() @ dW.t()
    close(layer(x).double(), ref)


# --------------------------------------------------------------------------- dtypes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("tokens", [24, 300])
def test_bf16_weights_and_input(tokens):
    layer = make_layer(64, 32, 8, 2, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_B.dtype == torch.bfloat16
    x = torch.randn(4, tokens // 4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = ref_dense(layer, x.detach(), layer.lora_A.detach(), layer.lora_B.detach())
    assert _rel(y.detach(), ref) < 1e-2
    delta = ref - ref_dense(layer, x.detach(), layer.lora_A.detach(), torch.zeros_like(layer.lora_B))
    assert _rel(y.detach().double() - layer.base(x).detach().double(), delta) < 3e-2
    y.sum().backward()
    assert layer.lora_B.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_fp32_under_bf16_autocast():
    layer = make_layer(64, 32, 8, 2)
    x = torch.randn(4, 6, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base_y = layer.base(x)
    assert y.dtype == torch.bfloat16 == base_y.dtype
    ref = ref_dense(layer, x.detach(), layer.lora_A.detach(), layer.lora_B.detach())
    assert _rel(y.detach(), ref) < 1e-2
    g = torch.randn_like(ref)
    y.backward(g.to(y.dtype))
    # the parameters stay fp32 and their gradients too, close to the fp32 reference
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    A_ref = layer.lora_A.detach().double().requires_grad_()
    B_ref = layer.lora_B.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    ref_dense(layer, x_ref, A_ref, B_ref).backward(g)
    assert _rel(layer.lora_A.grad, A_ref.grad) < 2e-2
    assert _rel(layer.lora_B.grad, B_ref.grad) < 2e-2
    assert _rel(x.grad, x_ref.grad) < 2e-2


def _cpu_fp16_ok() -> bool:
    try:
        a = torch.randn(8, 8, dtype=torch.float16)
        F.linear(a, a, a[0]).sum()
        (a @ a).addmm_(a, a)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _cpu_fp16_ok(), reason="CPU has no fp16 matmul in this torch build")
def test_fp16_weights_and_input():
    layer = make_layer(64, 32, 8, 2, dtype=torch.float16)
    x = torch.randn(3, 64, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16
    ref = ref_dense(layer, x, layer.lora_A.detach(), layer.lora_B.detach())
    assert _rel(y, ref) < 2e-3


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_kaiming_init_per_block_and_zero_B(base):
    d_in, d_out, n, r = 2048, 512, 8, 4
    torch.manual_seed(0)
    b = conv1d(d_in, d_out) if base == "conv1d" else linear(d_in, d_out)
    layer = MELoRALinear(b, r=r, n=n, alpha=8.0)
    bound = 1.0 / math.sqrt(d_in // n)  # Kaiming-uniform(a=sqrt(5)) with fan-in d_in/n
    A = layer.lora_A.detach()
    assert A.shape == (n, r, d_in // n)
    assert A.abs().max() <= bound
    for i in range(n):  # each block (r * d_in/n = 1024 entries) fills its own bound
        assert A[i].abs().max() > 0.9 * bound
        assert abs(float(A[i].mean())) < 0.1 * bound
    # uniform on [-bound, bound]: std = bound / sqrt(3)
    assert float(A.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 5, d_in)
    assert torch.equal(layer(x), b(x))  # a fresh layer is exactly the base


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    r = 4
    layer = MELoRALinear(linear(512, 256), r=r, n=2, init="gaussian")
    A = layer.lora_A.detach()
    assert float(A.std()) == pytest.approx(1.0 / r, rel=0.05)
    assert abs(float(A.mean())) < 0.02
    assert torch.count_nonzero(layer.lora_B) == 0
    with pytest.raises(ValueError, match="init='xavier'"):
        layer.reset_parameters("xavier")


# --------------------------------------------------------------------------- n = 1 is PEFT LoRA


from support import tiny_bert


def test_n1_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    r, alpha = 4, 8.0
    base = tiny_bert()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"]))
    inject_melora(base, MELoRAConfig(r=r, n=1, alpha=alpha, dropout=0.0, target_modules=["query", "value"]))
    layers = melora_layers(base)
    assert len(layers) == 4
    torch.manual_seed(1)
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
        pl = peft_model.base_model.model.get_submodule(name)
        assert pl.scaling["default"] == pytest.approx(alpha / r) == layer.scaling
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(layer.lora_A[0])  # (r, d_in)
            pl.lora_B["default"].weight.copy_(layer.lora_B[0])  # (d_out, r)
    base.eval()
    peft_model.eval()
    ids = torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0))
    out = base(input_ids=ids).logits
    ref = peft_model(input_ids=ids).logits
    close(out, ref)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    assert (out.detach() - plain).abs().max() > 1e-3  # the adapters really change the output

    # and the gradients of A and B are PEFT's gradients
    out.sum().backward()
    ref.sum().backward()
    for name, layer in layers.items():
        pl = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad[0], pl.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad[0], pl.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(32, 32, 4, 2), (48, 24, 8, 1), (24, 72, 3, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_merge_unmerge_round_trip(shape, base):
    d_in, d_out, n, r = shape
    layer = make_layer(d_in, d_out, n, r, base=base).eval()
    x = torch.randn(4, 7, d_in)
    W0 = layer.base.weight.detach().clone()
    y = layer(x).detach()

    # delta_weight is the block_diag reference, built here block by block
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    blocks = [(4.0 / r) * (B[i] @ A[i]) for i in range(n)]
    ref_delta = torch.zeros(d_out, d_in)
    k, o = d_in // n, d_out // n
    for i, blk in enumerate(blocks):
        ref_delta[i * o:(i + 1) * o, i * k:(i + 1) * k] = blk
    torch.testing.assert_close(layer.delta_weight(), ref_delta, rtol=1e-6, atol=1e-6)
    assert layer.delta_weight().shape == (d_out, d_in)

    layer.merge()
    assert layer.merged
    stored = layer.base.weight.detach()
    expect = W0 + (ref_delta.t() if base == "conv1d" else ref_delta)
    torch.testing.assert_close(stored, expect, rtol=1e-6, atol=1e-6)
    ym = layer(x)
    assert float((ym - y).norm() / y.norm()) < 1e-5
    # while merged the forward is the base alone: no second update
    assert torch.equal(ym, layer.base(x))
    layer.merge()  # idempotent
    torch.testing.assert_close(layer.base.weight.detach(), expect, rtol=1e-6, atol=1e-6)

    layer.unmerge()
    assert not layer.merged
    assert (layer.base.weight.detach() - W0).abs().max() <= 1e-6
    layer.unmerge()  # idempotent
    assert (layer.base.weight.detach() - W0).abs().max() <= 1e-6
    close(layer(x), y)


# --------------------------------------------------------------------------- layer-level errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"r=0 is not valid"),
    (dict(n=0), r"n=0 is not valid"),
    (dict(alpha=0.0), r"alpha=0\.0 is not valid"),
    (dict(dropout=1.0), r"dropout=1\.0 is not valid"),
    (dict(dropout=-0.1), r"dropout=-0\.1 is not valid"),
    (dict(n=3), r"n=3 does not divide d_in=32 and d_out=16; n must be one of 1, 2, 4, 8, 16"),
    (dict(n=8, r=4), r"n\*r=8\*4=32 exceeds min\(d_in, d_out\)=16"),
])
def test_layer_rejects_bad_settings(kwargs, match):
    base = linear(32, 16)
    with pytest.raises(ValueError, match=match) as e:
        MELoRALinear(base, **{"r": 1, "n": 2, **kwargs})
    assert "\n" not in str(e.value)


def test_layer_rejects_non_linear_base():
    with pytest.raises(TypeError, match="Conv2d"):
        MELoRALinear(nn.Conv2d(3, 3, 1))


# --------------------------------------------------------------------------- torch.compile


def test_compiles_as_one_graph_over_varying_shapes():
    """No graph break (fullgraph=True) and no recompilation across sequence lengths."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = make_layer(32, 48, 4, 2)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for lead in [(2, 70), (3, 5), (7, 11), (4, 70)]:
        x = torch.randn(*lead, 32, requires_grad=True)
        y = compiled(x)
        close(y.detach().double(), ref_dense(layer, x.detach(), layer.lora_A.detach(), layer.lora_B.detach()))
        y.sum().backward()
        x_ref = x.detach().double().requires_grad_()
        ref_dense(layer, x_ref, layer.lora_A.detach(), layer.lora_B.detach()).sum().backward()
        close(x.grad.double(), x_ref.grad)
    # one graph per side of the fold threshold (tokens >= 4 * features), nothing else
    assert counter.frame_count <= 2
