"""Lightning callbacks of melora-lit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ..data.glue_submission import SUBMISSION_COLUMN, write_submission
from ..run import check_output, remove_stale_temp_files, staged


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` results next to the input rows.

    Args:
        output_file: ``.csv`` or ``.jsonl`` path; default ``predictions.csv`` in the run's
            log directory (``predictions.jsonl`` for a causal LM). Each row holds the input
            columns plus, for a classifier, ``prediction`` (a label name, or a score for
            regression) and ``score`` (the predicted class probability); for a causal LM
            (``task: causal-lm``), ``instruction``, ``input`` and the generated ``response``.
        submission_dir: where a GLUE test split's leaderboard files go (``RTE.tsv``, ...; see
            :mod:`melora_lit.data.glue_submission`); default ``glue_submission/`` beside the
            predictions file.
        overwrite: replace an existing ``output_file`` (refused before any prediction otherwise).
    """

    def __init__(self, output_file: str | None = None, submission_dir: str | None = None,
                 overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file
        self.submission_dir = submission_dir
        self.overwrite = overwrite
        self.written: Path | None = None
        self.submission: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "predict" and self.output_file:  # refused before the predictions are made
            check_output(self.output_file, "prediction_writer.output_file", self.overwrite,
                         suffixes=(".csv", ".jsonl"), overwrite_option="--prediction_writer.overwrite true")
            remove_stale_temp_files(Path(self.output_file).expanduser().parent)

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # Lightning nests both per dataloader (predictions only when there are several); the
        # data modules give predict a single dataloader.
        if predictions and isinstance(predictions[0], list):
            predictions = predictions[0]
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]
        rows: dict[int, dict[str, Any]] = {}
        raw = getattr(trainer.datamodule, "raw_predict", None) if trainer.datamodule is not None else None
        for out, indices in zip(predictions, batch_indices):
            for j, i in enumerate(indices):
                row = dict(raw[int(i)]) if raw is not None else {"index": int(i)}
                row.update({k: v[j] for k, v in out.items()})
                rows[int(i)] = row
        default = "predictions.jsonl" if getattr(pl_module, "is_causal_lm", False) else "predictions.csv"
        path = Path(self.output_file) if self.output_file else Path(trainer.log_dir or ".") / default
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        ordered = [rows[i] for i in sorted(rows)]
        with staged(path, "w", newline="") as f:  # never a half-written predictions file
            if path.suffix == ".jsonl":
                for row in ordered:
                    f.write(json.dumps(row) + "\n")
            else:
                fields = list(dict.fromkeys(k for row in ordered for k in row))
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(ordered)
        self.written = path
        print(f"melora-lit: wrote {len(ordered)} predictions to {path}")
        if ordered and SUBMISSION_COLUMN in ordered[0]:
            self._write_submission(trainer, ordered, getattr(pl_module, "label_names", None), path)

    def _write_submission(self, trainer: L.Trainer, rows: list[dict[str, Any]], label_names: list[str] | None,
                          predictions_file: Path) -> None:
        if trainer.world_size > 1:  # each process holds a part of the test rows
            print("melora-lit: GLUE submission files need the whole test split: run predict with one device")
            return
        folder = Path(self.submission_dir) if self.submission_dir else predictions_file.parent / "glue_submission"
        self.submission = write_submission(rows, folder, label_names)
        for path in self.submission:
            print(f"melora-lit: wrote the GLUE leaderboard file {path}")
