"""Generation-based evaluation of a causal LM on held-out conversations: exact match, token F1
and ROUGE-L of the generated replies against the reference replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import MeanMetric
from torchmetrics.functional.text import rouge_score, squad

from ..run import staged

__all__ = ["GenerationEvaluation", "reply_scores"]


def reply_scores(prediction: str, reference: str) -> dict[str, float]:
    """``exact_match`` and ``token_f1`` as SQuAD scores them (lower case, no punctuation, articles
    or extra spaces; F1 over the words in common), and ``rougeL`` (the F-measure of the longest
    common word subsequence), each in [0, 1]."""
    result = squad([{"prediction_text": prediction, "id": "0"}],
                   [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}])
    rouge = rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"]
    return {"exact_match": float(result["exact_match"]) / 100, "token_f1": float(result["f1"]) / 100,
            "rougeL": float(rouge)}


class GenerationEvaluation(Callback):
    """At the end of each validation: reply to the prompts of the first ``num_examples``
    validation conversations (each cut before its last assistant turn), score the replies against
    that turn (:func:`reply_scores`), log the means as ``val/gen_exact_match``,
    ``val/gen_token_f1`` and ``val/gen_rougeL``, and write each example (prompt messages,
    reference, reply, scores) as a line of ``generations/step_STEP.jsonl`` in the run's folder.

    Decoding follows the model's ``generation`` settings. Needs a data module with
    ``generation_examples`` (every :class:`~melora_lit.data.causal_lm.CausalLMDataModule`: chat
    and instruction data); with several processes, each replies to its share of the examples, the
    logged means cover them all and each process writes its own file (``.rankN``).

    Args:
        num_examples: Validation conversations to reply to (the first ones; 0 turns this off).
        output_dir: Folder of the per-example files (default: ``generations`` in the run's folder).
    """

    def __init__(self, num_examples: int = 32, output_dir: str | None = None) -> None:
        if not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples={num_examples!r} is not valid; use an integer >= 0")
        self.num_examples = num_examples
        self.output_dir = output_dir
        self.written: Path | None = None
        self.last_scores: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_examples == 0:
            return
        dm = trainer.datamodule
        if not hasattr(dm, "generation_examples") or not getattr(getattr(pl_module, "task", None), "generates", False):
            raise ValueError("GenerationEvaluation needs a causal LM (task: causal-lm) and its data (ChatDataModule, "
                             f"InstructionDataModule or another CausalLMDataModule); got {type(dm).__name__}")
        raw, loader = dm.generation_examples(self.num_examples)
        rank, world = trainer.global_rank, trainer.world_size
        means = {k: MeanMetric().to(pl_module.device) for k in ("exact_match", "token_f1", "rougeL")}
        rows: list[dict[str, Any]] = []
        index = 0
        for b, batch in enumerate(loader):
            size = len(batch["input_ids"])
            if b % world == rank:
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                replies = pl_module.generate(batch["input_ids"], batch["attention_mask"])
                for j, reply in enumerate(replies):
                    example = raw[index + j]
                    scores = reply_scores(reply, example["reference"])
                    for k, v in scores.items():
                        means[k].update(torch.tensor(v))
                    rows.append({"record": example["record"], "messages": example["messages"],
                                 "reference": example["reference"], "reply": reply, **scores})
            index += size
        # compute() averages over every process's examples
        self.last_scores = {k: float(m.compute()) for k, m in means.items()}
        for k, v in self.last_scores.items():
            pl_module.log(f"val/gen_{k}", v)
        self._write(trainer, rows)

    def _write(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "generations"
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = folder / f"step_{trainer.global_step}{suffix}.jsonl"
        with staged(path, "w", encoding="utf-8") as f:  # whole or absent (melora_lit.run)
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        self.written = path
