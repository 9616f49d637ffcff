"""Lightning callbacks of melora-lit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ..run import PREDICTION_SUFFIXES, check_output, remove_stale_temp_files, staged
from .tasks import Task

if TYPE_CHECKING:
    from ..data.base import SubmissionWriter


class PredictionWriter(BasePredictionWriter):
    """Write ``predict`` results next to the input rows.

    Args:
        output_file: ``.csv`` or ``.jsonl`` path; default the task's file in the run's log
            directory (``predictions.csv``; ``predictions.jsonl`` for a causal LM). Each row holds
            the input columns plus the task's columns: for a classifier, ``prediction`` (a label
            name, or a score for regression) and ``score`` (the predicted class probability); for
            a causal LM (``task: causal-lm``), the generated ``response``.
        submission_dir: where the data module's submission files go (its ``submission_writer()``:
            a GLUE test split's leaderboard files, ``RTE.tsv``, ...; see
            :mod:`melora_lit.data.glue_submission`); default the folder it names beside the
            predictions file (``glue_submission/``). The folder is written whole (replacing one there).
        overwrite: replace an existing ``output_file`` and ``submission_dir`` (refused before any
            prediction otherwise).
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
        if stage != "predict":
            return
        # refused before the predictions are made (the CLI refused what it could before the model
        # and the data were read: melora_lit.run.check_run_outputs); the new run's folder may hold them
        flag = "--overwrite"
        path = self._path(trainer, pl_module)
        if self.output_file:
            check_output(self.output_file, "prediction_writer.output_file", self.overwrite,
                         suffixes=PREDICTION_SUFFIXES, overwrite_option=flag, current=trainer.log_dir)
        remove_stale_temp_files(path.parent)
        submission = self._submission(trainer)
        if submission is not None and trainer.world_size == 1:
            folder = self._submission_folder(submission, path)
            check_output(folder, "prediction_writer.submission_dir", self.overwrite, folder=True,
                         overwrite_option=flag, current=trainer.log_dir)
            remove_stale_temp_files(folder.parent)

    def _path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        task = getattr(pl_module, "task", None)
        default = (task if isinstance(task, Task) else Task).prediction_file
        path = Path(self.output_file) if self.output_file else Path(trainer.log_dir or ".") / default
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def _submission_folder(self, submission: SubmissionWriter, predictions_file: Path) -> Path:
        return Path(self.submission_dir) if self.submission_dir else predictions_file.parent / submission.folder

    @staticmethod
    def _submission(trainer: L.Trainer) -> SubmissionWriter | None:
        """The files the data module makes of the predictions besides the predictions file (GLUE's
        leaderboard files: :meth:`~melora_lit.data.base.MELoRADataModule.submission_writer`), if any."""
        provide = getattr(trainer.datamodule, "submission_writer", None)
        return provide() if callable(provide) else None

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
        path = self._path(trainer, pl_module)
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
        submission = self._submission(trainer) if ordered else None
        if submission is not None:
            self._write_submission(trainer, submission, ordered, getattr(pl_module, "label_names", None), path)

    def _write_submission(self, trainer: L.Trainer, submission: SubmissionWriter, rows: list[dict[str, Any]],
                          label_names: list[str] | None, predictions_file: Path) -> None:
        if trainer.world_size > 1:  # each process holds a part of the test rows
            print(f"melora-lit: {submission.name} submission files need the whole test split: run predict with one "
                  f"device")
            return
        self.submission = submission.write(rows, self._submission_folder(submission, predictions_file), label_names)
        for path in self.submission:
            print(f"melora-lit: wrote the {submission.name} leaderboard file {path}")
