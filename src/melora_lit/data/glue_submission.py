"""GLUE leaderboard submissions: the unlabelled test splits and the files gluebenchmark.com takes.

``melora-lit predict`` with ``--data.init_args.predict_split test`` predicts the task's test
split (from ``<data_dir>/<TASK>/test.tsv`` in the original layout, or the hub's ``test``
split); the prediction writer then writes the leaderboard's file(s) for it
(:func:`write_submission`): ``index`` and ``prediction`` columns, tab-separated, with the label
values of the original GLUE files: ``0``/``1`` for CoLA, SST-2, MRPC, QQP and WNLI,
``entailment``/``not_entailment`` for QNLI and RTE, ``entailment``/``neutral``/``contradiction``
for MNLI and AX, a score for STS-B. The MNLI model writes ``MNLI-m.tsv``, ``MNLI-mm.tsv`` and
``AX.tsv`` (the diagnostic set, ``<data_dir>/diagnostic/diagnostic.tsv`` or the hub's ``ax``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset, Features, Value, concatenate_datasets, load_dataset

from ..errors import describe, first_line
from ..run import staged_folder

__all__ = ["GLUE_HUB_DATASET", "SUBMISSION_COLUMN", "SUBMISSION_FILES", "GLUESubmission", "glue_test_split",
           "write_submission"]

#: GLUE on the Hugging Face hub (the data module's train and dev splits, and the test splits here)
GLUE_HUB_DATASET = "nyu-mll/glue"

# the raw predict rows of a test split carry the submission file they belong to in this column
SUBMISSION_COLUMN = "glue_file"


@dataclass(frozen=True)
class _TestFile:
    name: str  # submission file stem (CoLA, MNLI-m, AX, ...)
    tsv: str  # path under data_dir in the original layout
    index_column: str  # the TSV's id column (QQP: "id")
    columns: dict[str, str]  # TSV text column -> hub column
    hub: tuple[str, str]  # (hub config, split)


def _pair(first: str, second: str) -> dict[str, str]:
    return {"sentence1": first, "sentence2": second}


_NLI = _pair("premise", "hypothesis")
_TEST_FILES: dict[str, tuple[_TestFile, ...]] = {
    "cola": (_TestFile("CoLA", "CoLA/test.tsv", "index", {"sentence": "sentence"}, ("cola", "test")),),
    "sst2": (_TestFile("SST-2", "SST-2/test.tsv", "index", {"sentence": "sentence"}, ("sst2", "test")),),
    "mrpc": (_TestFile("MRPC", "MRPC/test.tsv", "index", {"#1 String": "sentence1", "#2 String": "sentence2"},
                       ("mrpc", "test")),),
    "qqp": (_TestFile("QQP", "QQP/test.tsv", "id", {"question1": "question1", "question2": "question2"},
                      ("qqp", "test")),),
    "stsb": (_TestFile("STS-B", "STS-B/test.tsv", "index", _pair("sentence1", "sentence2"), ("stsb", "test")),),
    "mnli": (
        _TestFile("MNLI-m", "MNLI/test_matched.tsv", "index", _NLI, ("mnli", "test_matched")),
        _TestFile("MNLI-mm", "MNLI/test_mismatched.tsv", "index", _NLI, ("mnli", "test_mismatched")),
        _TestFile("AX", "diagnostic/diagnostic.tsv", "index", _NLI, ("ax", "test")),
    ),
    "qnli": (_TestFile("QNLI", "QNLI/test.tsv", "index", {"question": "question", "sentence": "sentence"},
                       ("qnli", "test")),),
    "rte": (_TestFile("RTE", "RTE/test.tsv", "index", _pair("sentence1", "sentence2"), ("rte", "test")),),
    "wnli": (_TestFile("WNLI", "WNLI/test.tsv", "index", _pair("sentence1", "sentence2"), ("wnli", "test")),),
}

# How the leaderboard spells a prediction: the label values of the original GLUE files. The
# hub's class ids of CoLA, SST-2, MRPC, QQP and WNLI are those 0/1 values; the NLI tasks use names.
_AS_ID = {"CoLA", "SST-2", "MRPC", "QQP", "WNLI"}
_AS_SCORE = {"STS-B"}
SUBMISSION_FILES: tuple[str, ...] = tuple(f.name for files in _TEST_FILES.values() for f in files)


def glue_test_split(task: str, data_dir: str | None, cache_dir: str | None = None) -> Dataset:
    """The unlabelled test rows of a GLUE task, with the hub's text column names, ``index``
    (the id the leaderboard matches) and :data:`SUBMISSION_COLUMN` (the file each row goes to;
    MNLI: matched, mismatched and the AX diagnostic set, in that order)."""
    parts = [_read_hub(spec, cache_dir) if data_dir is None else _read_tsv(spec, Path(data_dir).expanduser(), cache_dir)
             for spec in _TEST_FILES[task]]
    return concatenate_datasets(parts)


def _read_tsv(spec: _TestFile, root: Path, cache_dir: str | None) -> Dataset:
    path = root / spec.tsv
    if not path.is_file():
        raise ValueError(f"GLUE test file not found: {path} (the test split of the original GLUE layout; "
                         f"or leave --data.init_args.data_dir unset to use the hub's test split)")
    usecols = [spec.index_column, *spec.columns]
    try:
        ds = load_dataset("csv", data_files=str(path.resolve()), split="train", sep="\t",
                          quoting=csv.QUOTE_NONE,  # GLUE texts hold bare '"' characters
                          encoding="utf-8-sig", usecols=usecols, keep_default_na=False,
                          features=Features({c: Value("string") for c in usecols}), cache_dir=cache_dir)
    except Exception as err:  # a missing column or an unreadable file
        raise ValueError(f"cannot read the GLUE test file {path} (expected columns {usecols}): "
                         f"{describe(err)}") from err
    ds = ds.rename_columns({spec.index_column: "index", **{k: v for k, v in spec.columns.items() if k != v}})
    return ds.add_column(SUBMISSION_COLUMN, [spec.name] * ds.num_rows)


def _read_hub(spec: _TestFile, cache_dir: str | None) -> Dataset:
    config, split = spec.hub
    try:
        ds = load_dataset(GLUE_HUB_DATASET, config, split=split, cache_dir=cache_dir)
    except Exception as err:  # offline, not cached, or any other hub failure
        raise ValueError(f"cannot load the GLUE test split {config}/{split} from the hub ({GLUE_HUB_DATASET}): "
                         f"{first_line(err)}; pass --data.init_args.data_dir with the GLUE TSVs ({spec.tsv})") from err
    ds = ds.remove_columns([c for c in ds.column_names if c == "label"]).rename_column("idx", "index")
    ds = ds.cast_column("index", Value("string"))
    return ds.add_column(SUBMISSION_COLUMN, [spec.name] * ds.num_rows)


def _leaderboard_value(name: str, prediction: Any, label_names: list[str] | None) -> str:
    if name in _AS_SCORE:
        return f"{float(prediction):.4f}"
    if name in _AS_ID:
        return str(label_names.index(prediction)) if label_names else str(prediction)
    return str(prediction)


class GLUESubmission:
    """The GLUE leaderboard's files of a predicted test split: what :class:`~melora_lit.data.GLUEDataModule`
    gives the prediction writer (a :class:`~melora_lit.data.base.SubmissionWriter`)."""

    name = "GLUE"
    folder = "glue_submission"

    def write(self, rows: list[dict[str, Any]], folder: Path, label_names: list[str] | None) -> list[Path]:
        return write_submission(rows, folder, label_names)


def write_submission(rows: Iterable[dict[str, Any]], folder: Path, label_names: list[str] | None) -> list[Path]:
    """Write one leaderboard file per :data:`SUBMISSION_COLUMN` value of ``rows`` into ``folder``
    (``RTE.tsv``: ``index<TAB>prediction``); ``prediction`` is the model's label name (or score).
    The folder is written whole or not at all, replacing one there (the caller checked that it may:
    :func:`~melora_lit.run.staged_folder`); a file name other than :data:`SUBMISSION_FILES` is
    refused (the names come from the data: none may leave the folder)."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        name = row[SUBMISSION_COLUMN]
        if name not in SUBMISSION_FILES:
            raise ValueError(f"{SUBMISSION_COLUMN}={name!r} is not a GLUE leaderboard file; the files are "
                             f"{', '.join(SUBMISSION_FILES)}")
        by_file.setdefault(name, []).append((str(row["index"]), _leaderboard_value(name, row["prediction"],
                                                                                    label_names)))
    with staged_folder(folder) as staging:
        for name, lines in by_file.items():
            with open(staging / f"{name}.tsv", "w", newline="") as f:
                writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                writer.writerow(["index", "prediction"])
                writer.writerows(lines)
    return [folder / f"{name}.tsv" for name in by_file]
