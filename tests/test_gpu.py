"""MELoRA on a CUDA device, against float64 references computed on the CPU.

Marked ``gpu`` and skipped without CUDA (CI). Run on a GPU machine with
``python -m pytest -m gpu tests/test_gpu.py``; ``benchmarks/gpu_check.py`` runs it first.

The layer checks compare the CUDA layer (the plain-torch autograd Function; the fused kernels
are CPU only) with ``support.dense_delta``'s block-diagonal update in float64, for the output and
the input, A and B gradients. With dropout, the mask is the layer's own draw, reconstructed by
re-seeding and calling ``F.dropout`` on the same (tokens, d_in) view, as the layer does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from melora_lit import MELoRAConfig, MELoRALinear, inject_melora, load_adapter, save_adapter
from support import dense_delta, save_tiny_bert, sentiment_rows, tiny_bert, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]

# relative error (Frobenius norm) allowed against float64, by dtype: round-off of the dtype
# over sums of d_in terms; an error in the method (a wrong block, a missing scale) is O(1)
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double().cpu() - ref).norm() / ref.norm())


def cuda_layer(d_in: int, d_out: int, n: int, r: int, dtype: torch.dtype, dropout: float = 0.0) -> MELoRALinear:
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(d_in, d_out), r=r, n=n, alpha=4.0, dropout=dropout)
    with torch.no_grad():  # B starts at zero; make the update visible
        layer.lora_B.normal_(std=0.5)
    return layer.to("cuda", dtype).train()


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: TF32 matmuls would round to 10 mantissa bits."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("tokens", [24, 600])  # below and above the fp32 fold threshold (4 x features)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_on_cuda_matches_float64_block_diagonal(dtype, dropout, tokens):
    d_in, d_out, n, r = 64, 96, 8, 2
    layer = cuda_layer(d_in, d_out, n, r, dtype, dropout)
    x = torch.randn(tokens // 4, 4, d_in, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(tokens // 4, 4, d_out, device="cuda", dtype=dtype)
    torch.manual_seed(123)
    y = layer(x)
    y.backward(g)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert layer.lora_A.grad.dtype == dtype and x.grad.dtype == dtype

    if dropout:
        torch.manual_seed(123)  # the layer's draw: F.dropout on the (tokens, d_in) view
        xd = F.dropout(x.detach().reshape(-1, d_in), p=dropout, training=True).view(x.shape)
        mask = ((xd != 0).double() / (1 - dropout)).cpu()
        assert 0 < float((xd == 0).float().mean()) < 1
    else:
        mask = torch.ones(x.shape, dtype=torch.float64)
    W = layer.base.weight.detach().double().cpu()
    b = layer.base.bias.detach().double().cpu()
    x_ref = x.detach().double().cpu().requires_grad_()
    A_ref = layer.lora_A.detach().double().cpu().requires_grad_()
    B_ref = layer.lora_B.detach().double().cpu().requires_grad_()
    ref = x_ref @ W.t() + b + (x_ref * mask) @ dense_delta(A_ref, B_ref, layer.alpha / r).t()
    ref.backward(g.double().cpu())

    tol = REL_TOL[dtype]
    assert rel(y.detach(), ref.detach()) < tol
    # the update alone, so that a wrong update cannot hide under the base output
    delta = (ref - x_ref @ W.t() - b).detach()
    assert rel(y.detach().double().cpu() - (x.detach().double().cpu() @ W.t() + b), delta) < 10 * tol
    assert rel(x.grad, x_ref.grad) < tol
    assert rel(layer.lora_A.grad, A_ref.grad) < tol
    assert rel(layer.lora_B.grad, B_ref.grad) < tol
    assert all(p.grad is None for p in layer.base.parameters())


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_adapters_built_on_cuda_start_where_a_cpu_run_starts(init):
    """A layer made on a CUDA base draws A as on the CPU (the CUDA generator draws other
    numbers for the same seed): a model injected on the GPU starts where a CPU one starts."""
    def build(device: str) -> MELoRALinear:
        torch.manual_seed(3)
        base = nn.Linear(64, 96).to(device)  # the base drawn on the CPU in both
        return MELoRALinear(base, r=2, n=8, init=init)  # the adapters on the base's device

    cpu, cuda = build("cpu"), build("cuda")
    assert cuda.lora_A.device.type == "cuda"
    assert torch.equal(cuda.lora_A.cpu(), cpu.lora_A) and not cuda.lora_B.any()
    assert cpu.lora_A.abs().sum() > 0


def test_merge_and_unmerge_on_cuda():
    layer = cuda_layer(64, 32, 4, 2, torch.float32).eval()
    x = torch.randn(10, 64, device="cuda")
    before_w = layer.base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.base.weight.device.type == "cuda"
    expected_w = before_w.double().cpu() + dense_delta(layer.lora_A.detach().double().cpu(),
                                                       layer.lora_B.detach().double().cpu(), layer.alpha / 2)
    assert rel(layer.base.weight.detach(), expected_w) < 1e-6
    assert rel(layer(x), y.double().cpu()) < 1e-5
    layer.unmerge()
    assert not layer.merged
    assert float((layer.base.weight - before_w).abs().max()) < 1e-5
    assert rel(layer(x), y.double().cpu()) < 1e-5


@pytest.mark.parametrize("direction", ["cuda-to-cpu", "cpu-to-cuda"])
def test_adapter_file_moves_between_cuda_and_cpu(tmp_path, direction):
    src_dev, dst_dev = direction.split("-to-")
    config = MELoRAConfig(r=2, n=4, alpha=4, dropout=0.0, target_modules=["query", "value"])
    trained = tiny_bert(seed=0).to(src_dev)
    inject_melora(trained, config)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.5)
    save_adapter(trained, tmp_path / "adapter", config)
    fresh = tiny_bert(seed=0).to(dst_dev)  # same base weights, no adapter yet
    load_adapter(fresh, tmp_path / "adapter")
    assert all(p.device.type == dst_dev for p in fresh.parameters())
    ids = torch.randint(1, 99, (3, 9), generator=torch.Generator().manual_seed(0))

    def last_hidden(model: nn.Module, device: str) -> torch.Tensor:
        out = model.eval()(input_ids=ids.to(device), output_hidden_states=True)
        return out.hidden_states[-1].double().cpu()

    with torch.no_grad():
        want, got = last_hidden(trained, src_dev), last_hidden(fresh, dst_dev)
        plain = last_hidden(tiny_bert(seed=0), "cpu")
    assert float((got - want).abs().max()) < 1e-4
    assert float((want - plain).abs().max()) > 1e-3  # the adapter changes the output


# --------------------------------------------------------------------------- Lightning on CUDA


@pytest.fixture(scope="module")
def gpu_bert(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("gpu-bert"), dropout=False, hidden=32, layers=2, heads=2,
                          max_positions=64)


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory, gpu_bert) -> dict:
    """The same 2 epochs of training on CUDA in 32-true, bf16-mixed and 16-mixed."""
    from melora_lit.cli import cli_main
    from support import write_csv

    work = tmp_path_factory.mktemp("gpu-runs")
    csv = write_csv(work / "train.csv", sentiment_rows(64, seed=3))
    runs = {}
    for precision in ("32-true", "bf16-mixed", "16-mixed"):
        root = work / precision
        cfg = write_config(work / f"{precision}.yaml", gpu_bert, csv, root,
                           trainer={"accelerator": "gpu", "precision": precision},
                           model_args={"melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.0,
                                                  "target_modules": ["query", "value"]}})
        torch.manual_seed(0)
        cli = cli_main(["fit", "--config", str(cfg)])
        runs[precision] = {"cli": cli, "root": root, "config": cfg,
                           "ckpt": root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                           "val_loss": float(cli.trainer.callback_metrics["val/loss"])}
    return runs


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_on_cuda_follows_fp32(gpu_runs, precision):
    run, ref = gpu_runs[precision], gpu_runs["32-true"]
    model = run["cli"].model
    lora = {k: v for k, v in model.named_parameters() if "lora_" in k}
    # fp32 master weights under 16-bit autocast (Lightning's teardown has moved the module back to the CPU)
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_B"))  # B starts at 0
    ref_lora = dict(ref["cli"].model.named_parameters())
    # 12 steps with 16-bit matmuls stay close to the fp32 run: B (which starts at 0) within a
    # quarter of the way it travelled, A (kaiming) within a tenth of its norm
    for k, v in lora.items():
        size = float(ref_lora[k].detach().norm())
        bound = 0.25 * size if k.endswith("lora_B") else 0.1 * size
        assert float((v.detach() - ref_lora[k].detach()).norm()) < bound, k
    assert abs(run["val_loss"] - ref["val_loss"]) < 0.05 * abs(ref["val_loss"]) + 1e-3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_checkpoint_written_on_cuda_validates_on_cpu(gpu_runs, tmp_path, precision):
    from melora_lit.cli import cli_main

    run = gpu_runs[precision]
    saved = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k or "classifier" in k for k in saved["state_dict"])
    cpu = cli_main(["validate", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
                    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                    "--trainer.default_root_dir", str(tmp_path)])
    gpu = cli_main(["validate", "--config", str(run["config"]), "--ckpt_path", str(run["ckpt"]),
                    "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path / "gpu")])
    cpu_loss, gpu_loss = (float(c.trainer.callback_metrics["val/loss"]) for c in (cpu, gpu))
    assert abs(cpu_loss - gpu_loss) < 1e-4 * max(1.0, abs(gpu_loss))


def test_checkpoint_written_on_cpu_validates_on_cuda(gpu_runs, gpu_bert, tmp_path):
    from melora_lit.cli import cli_main

    cfg = gpu_runs["32-true"]["config"]
    root = tmp_path / "cpu-run"
    cli_main(["fit", "--config", str(cfg), "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(root)])
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    losses = {}
    for acc in ("cpu", "gpu"):
        v = cli_main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.accelerator", acc,
                      "--trainer.default_root_dir", str(tmp_path / f"val-{acc}")])
        losses[acc] = float(v.trainer.callback_metrics["val/loss"])
    assert abs(losses["cpu"] - losses["gpu"]) < 1e-4 * max(1.0, abs(losses["cpu"]))
