"""The fused Triton candidate (benchmarks/triton_melora.py) under Triton's CPU interpreter,
against float64 block-diagonal references: output, input gradient and factor gradients.

Triton is installed by ``scripts/setup.sh test`` in a folder of its own (``sys.prefix/triton-V``)
and used here in a subprocess with ``TRITON_INTERPRET=1``: the interpreter runs the kernels'
arithmetic and masking on CPU tensors. Whether they compile and how fast they run on a GPU is
``benchmarks/gpu_check.py``'s to find out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import TRITON_DIR

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from support import dense_delta
    from triton_melora import TritonMELoRA, supported
    from melora_lit import MELoRALinear

    results = []
    # tokens not a multiple of the 32-token block, features not multiples of the 32-wide tiles
    for dtype, t, d_in, d_out, n, r, needs_x_grad in [
            (torch.float32, 37, 96, 80, 4, 2, True), (torch.float32, 70, 64, 64, 8, 1, True),
            (torch.bfloat16, 45, 64, 96, 2, 3, True), (torch.float32, 33, 48, 48, 2, 16, False)]:
        torch.manual_seed(0)
        layer = MELoRALinear(nn.Linear(d_in, d_out), r=r, n=n, alpha=4.0).to(dtype)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.float(), layer.lora_B.float()
        assert supported(layer)
        x = torch.randn(t, d_in, dtype=dtype, requires_grad=needs_x_grad)
        g = torch.randn(t, d_out, dtype=dtype)
        y = TritonMELoRA(layer)(x)
        y.backward(g)
        # float64 reference: the dense block-diagonal update, autograd for the gradients
        A = layer.lora_A.detach().double().requires_grad_()
        B = layer.lora_B.detach().double().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        W, b = layer.base.weight.double(), layer.base.bias.double()
        y64 = x64 @ (W + dense_delta(A, B, layer.scaling)).T + b
        y64.backward(g.double())
        def rel(a, ref):
            return float((a.double() - ref).norm() / ref.norm())
        results.append({"case": f"{dtype} t={t} {d_in}->{d_out} n={n} r={r}", "dtype": str(dtype),
                        "y": rel(y.detach(), y64.detach()), "gA": rel(layer.lora_A.grad, A.grad),
                        "gB": rel(layer.lora_B.grad, B.grad),
                        "gx": rel(x.grad, x64.grad) if needs_x_grad else None,
                        "gA_dtype": str(layer.lora_A.grad.dtype), "y_dtype": str(y.dtype)})
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    if not (TRITON_DIR / "triton").is_dir():
        pytest.skip(f"triton not found at {TRITON_DIR} (scripts/setup.sh test installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(TRITON_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernels_match_float64_block_diagonal(interpreted):
    for case in interpreted:
        print(case)
        # fp32 activations: fp32 round-off; bf16: the output's own rounding (8 bits)
        tol = 1e-5 if case["dtype"] == "torch.float32" else 1e-2
        assert case["y"] < tol and case["gA"] < tol and case["gB"] < tol, case
        assert case["gx"] is None or case["gx"] < tol, case
        assert case["gA_dtype"] == "torch.float32" and case["y_dtype"] == case["dtype"]
