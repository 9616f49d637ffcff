"""The fused CPU kernels (csrc/melora_cpu.cpp): that they are really built and used here,
their dropout mask, and the fallback when they cannot be built.

Their arithmetic is checked against float64 dense references by every test of
test_melora_layer.py, which runs once with the kernels and once on the plain-torch path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from melora_lit import MELoRALinear
from melora_lit.adapter import cpu_kernels
from melora_lit.adapter.layer import _MELoRAFusedCPU
from support import dense_delta


def test_kernels_are_built_and_used_on_cpu_fp32(monkeypatch):
    """Unless switched off, the kernels must build on this machine (CI included): a silent
    fallback would leave them untested."""
    if cpu_kernels.kernels_setting() == "0":
        pytest.skip("MELORA_LIT_CPU_KERNELS=0")
    assert cpu_kernels.available(), "the CPU kernels did not build here; see the warning above"
    calls = []
    monkeypatch.setattr(_MELoRAFusedCPU, "apply", lambda *a: calls.append(a) or a[1].new_zeros(a[0].shape[0], 16))
    MELoRALinear(nn.Linear(8, 16), r=1, n=2)(torch.randn(3, 8))
    assert len(calls) == 1


def _layer(d_in: int, d_out: int, n: int, r: int, std: float = 1.0, **kwargs) -> MELoRALinear:
    """A seeded MELoRALinear with a non-zero B (as after training)."""
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(d_in, d_out), r=r, n=n, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=std)
    return layer


def _ops():
    if not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable")
    return torch.ops.melora_lit


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_is_bernoulli(p):
    ops = _ops()
    tokens, features = 2000, 384
    m = ops.dropout_mask(12345, tokens, features, p)
    kept = m != 0
    # kept entries are scaled by exactly 1/(1-p), as nn.Dropout does
    assert torch.equal(m[kept], torch.full_like(m[kept], 1 / (1 - p)))
    drop_rate = 1 - kept.double().mean().item()
    sigma = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(drop_rate - p) < 5 * sigma, (drop_rate, p)
    # every row and every column drops at the rate p (no stuck column or row pattern)
    col_rate = 1 - kept.double().mean(0)
    row_rate = 1 - kept.double().mean(1)
    assert (col_rate - p).abs().max() < 6 * (p * (1 - p) / tokens) ** 0.5
    assert (row_rate - p).abs().max() < 6 * (p * (1 - p) / features) ** 0.5
    # neighbours are uncorrelated, along rows and along columns
    k = kept.double() - kept.double().mean()
    for a, b in [(k[:, 1:], k[:, :-1]), (k[1:], k[:-1])]:
        corr = (a * b).mean() / k.var()
        assert abs(corr) < 5 / m.numel() ** 0.5
    # another seed gives another mask, the same seed the same one
    assert not torch.equal(m, ops.dropout_mask(12346, tokens, features, p))
    assert torch.equal(m, ops.dropout_mask(12345, tokens, features, p))


def test_dropout_mask_does_not_depend_on_the_thread_count():
    ops = _ops()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dropout_mask(7, 333, 96, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ops.dropout_mask(7, 333, 96, 0.1))


def test_dropout_follows_torch_manual_seed_and_differs_between_steps():
    """The mask's seed comes from torch's generator: torch.manual_seed reproduces a run, and
    two steps see two masks."""
    _ops()
    layer = _layer(64, 64, 4, 2, dropout=0.3)
    x = torch.randn(50, 64)
    torch.manual_seed(1)
    a, b = layer(x), layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))
    assert not torch.allclose(a, b)


def test_fold_and_unfold_agree_at_the_benchmark_shape():
    """d=768, n=8, r=1 at 4096 tokens (folded) and 700 tokens (update added to y), against a
    float64 dense block-diagonal reference: output and all three gradients."""
    _ops()
    layer = _layer(768, 768, 8, 1, std=0.02, alpha=16)
    for tokens in (4096, 700):
        x = torch.randn(tokens, 768, requires_grad=True)
        g = torch.randn(tokens, 768)
        y = layer(x)
        y.backward(g)
        xr = x.detach().double().requires_grad_()
        ar = layer.lora_A.detach().double().requires_grad_()
        br = layer.lora_B.detach().double().requires_grad_()
        dw = dense_delta(ar, br, 16)
        ref = xr @ (layer.base.weight.double() + dw).t() + layer.base.bias.double()
        ref.backward(g.double())
        for got, want in [(y, ref), (x.grad, xr.grad), (layer.lora_A.grad, ar.grad), (layer.lora_B.grad, br.grad)]:
            err = (got.double() - want).abs().max().item()
            assert err <= 1e-5 * max(1.0, want.abs().max().item()), (tokens, err)
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None


_CHILD = textwrap.dedent("""
    import warnings, torch
    from torch import nn
    from melora_lit import MELoRALinear
    from melora_lit.adapter import cpu_kernels
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(16, 8), r=2, n=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    ref = layer.base(x) + (x @ torch.block_diag(*(layer.lora_B[i] @ layer.lora_A[i] for i in range(2))).t()) * layer.scaling
    print("available", cpu_kernels.available())
    print("max_err", float((y - ref).abs().max()))
    print("warnings", [str(w.message) for w in caught])
""")


def _child(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env})


def test_setting_0_skips_the_build(tmp_path):
    out = _child(tmp_path, MELORA_LIT_CPU_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert "available False" in out.stdout and "warnings []" in out.stdout
    assert float(out.stdout.split("max_err ")[1].split()[0]) < 1e-5
    assert not (tmp_path / "ext").exists()  # nothing was compiled


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    """No working compiler: 'auto' warns once and computes the same function in torch;
    '1' refuses."""
    out = _child(tmp_path, CXX="/bin/false", MELORA_LIT_CPU_KERNELS="auto")
    assert out.returncode == 0, out.stderr
    assert "available False" in out.stdout
    assert float(out.stdout.split("max_err ")[1].split()[0]) < 1e-5
    assert "CPU kernels unavailable" in out.stdout and "MELORA_LIT_CPU_KERNELS=0" in out.stdout

    out = _child(tmp_path, CXX="/bin/false", MELORA_LIT_CPU_KERNELS="1")
    assert out.returncode != 0
    assert "MELORA_LIT_CPU_KERNELS=1 but the CPU kernels failed to build" in out.stderr


def test_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MELORA_LIT_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match=r"MELORA_LIT_CPU_KERNELS='yes' is not valid; use auto, 0 or 1"):
        cpu_kernels.kernels_setting()


@pytest.mark.parametrize("tokens", [6, 160], ids=["added", "folded"])  # 160 >= 4 * 32: folded
def test_torch_compile_uses_the_torch_path(tokens):
    """Under torch.compile the layer traces the plain-torch path (one graph, no opaque op), and
    computes the MELoRA function: outputs and factor gradients of a trained layer (B != 0) match
    the float64 block-diagonal reference."""
    graphs = []

    def backend(gm, example_inputs):  # records what dynamo captured, runs it as is
        graphs.append("\n".join(str(m.graph) for m in gm.modules() if hasattr(m, "graph")))
        return gm.forward

    torch._dynamo.reset()
    layer = _layer(32, 32, 4, 1, std=0.5)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(tokens, 32)
    y = compiled(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert len(graphs) == 1 and "bmm" in graphs[0] and "melora_lit" not in graphs[0]

    w, b = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    ar = layer.lora_A.detach().double().requires_grad_()
    br = layer.lora_B.detach().double().requires_grad_()
    base = x.double() @ w.t() + b
    ref = base + x.double() @ dense_delta(ar, br, layer.scaling).t()
    ref.backward(g.double())
    assert (ref - base).abs().max() > 0.1  # the adapter changes the output: the comparison is not vacuous
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), ar.grad, rtol=0, atol=1e-4 * ar.grad.abs().max().item())
    torch.testing.assert_close(layer.lora_B.grad.double(), br.grad, rtol=0, atol=1e-4 * br.grad.abs().max().item())


def test_cli_rejects_a_bad_setting_in_one_line(tmp_path):
    from support import run_main

    out = run_main("fit", cwd=tmp_path, env={"MELORA_LIT_CPU_KERNELS": "on"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("melora-lit: error: MELORA_LIT_CPU_KERNELS='on' is not valid; "
                                  "use auto, 0 or 1")
    assert not (tmp_path / "lightning_logs").exists()


def test_bf16_rows_are_computed_in_fp32_and_rounded_once():
    """bf16 activations: the update is computed in fp32 and added with one round-to-nearest-even,
    as torch's own fp32 -> bf16 conversion; NaN stays NaN."""
    ops = _ops()
    torch.manual_seed(0)
    tokens, d, n, r, s = 257, 96, 4, 2, 3.0
    a, b = torch.randn(n, r, d // n), torch.randn(n, d // n, r)
    x = torch.randn(tokens, d).bfloat16()
    y = torch.randn(tokens, d).bfloat16()
    y[5, 7] = float("nan")
    delta = x.double() @ dense_delta(a.double(), b.double(), s).t()
    want = (y.double() + delta).float().bfloat16()
    got = y.clone()
    ops.fwd_update_(got, x, a, b, s, 0.0, 0)
    assert got[5, 7].isnan() and want[5, 7].isnan()
    ok = ~want.isnan()
    # the fp32 sums differ from the float64 ones in their last bits: a tie can round the other
    # way, but never by more than one bf16 step
    step = (want.float().abs() * 2.0**-7).clamp_min(2.0**-126)
    assert ((got.float() - want.float()).abs()[ok] <= step[ok]).all()
    assert (got == want)[ok].double().mean() > 0.99
    # unchanged rows when the update is zero: the conversion itself is exact
    same = y.clone()
    ops.fwd_update_(same, x, a, torch.zeros_like(b), s, 0.0, 0)
    assert torch.equal(same[ok], y[ok])


def test_bf16_backward_matches_float64_reference():
    """bf16 activations with fp32 factors (as under bf16 autocast): gradients of A and B come
    back in fp32 and match a float64 reference computed from the same bf16 inputs."""
    _ops()
    layer = _layer(64, 48, 4, 2, alpha=8)
    x = torch.randn(300, 64)
    g = torch.randn(300, 48).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.requires_grad_())
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert layer.lora_A.grad.dtype == torch.float32
    xr = x.detach().bfloat16().double()
    ar = layer.lora_A.detach().double().requires_grad_()
    br = layer.lora_B.detach().double().requires_grad_()
    dw = dense_delta(ar, br, layer.scaling)
    (xr @ dw.t()).backward(g.double())
    for got, want in [(layer.lora_A.grad, ar.grad), (layer.lora_B.grad, br.grad)]:
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), err


def test_disabled_switches_only_the_current_thread():
    import threading

    _ops()
    seen = {}
    with cpu_kernels.disabled():
        seen["here"] = cpu_kernels.available()
        t = threading.Thread(target=lambda: seen.update(other=cpu_kernels.available()))
        t.start()
        t.join()
    assert seen == {"here": False, "other": True}
    assert cpu_kernels.available()


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_later_processes():
    """torch's build lock (a ``lock`` file in the build folder) stays behind when a build is
    killed, and every later process would wait for it forever: it is removed under the
    process-safe lock the kernels' builds take."""
    if cpu_kernels.kernels_setting() == "0":
        pytest.skip("MELORA_LIT_CPU_KERNELS=0")
    from torch.utils import cpp_extension

    assert cpu_kernels.available()  # built (here, in this folder) before the lock is planted
    build_dir = cpp_extension._get_build_directory(f"melora_lit_cpu_{cpu_kernels._machine_tag()}", False)
    stale = os.path.join(build_dir, "lock")
    open(stale, "w").close()  # what a SIGKILL during a build leaves
    try:
        out = subprocess.run([sys.executable, "-c", "from melora_lit.adapter import cpu_kernels; "
                              "print('available', cpu_kernels.available())"],
                             capture_output=True, text=True, timeout=120)
    finally:
        leftover = os.path.exists(stale)
        if leftover:
            os.remove(stale)
    assert out.returncode == 0 and "available True" in out.stdout, out.stderr[-2000:]
    assert not leftover
