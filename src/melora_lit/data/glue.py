"""The GLUE benchmark, from the hub (``nyu-mll/glue``) or from the original GLUE TSV files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from ..errors import describe, not_found
from ..metrics import glue_metrics
from .base import ClassificationDataModule, SubmissionWriter
from .glue_submission import GLUE_HUB_DATASET, SUBMISSION_COLUMN, GLUESubmission, glue_test_split

__all__ = ["GLUEDataModule", "GLUE_TASKS", "GLUE_HUB_DATASET"]


@dataclass(frozen=True)
class _Task:
    folder: str  # task folder in the original GLUE layout
    columns: dict[str, str]  # TSV column -> hub column; "label" is the target
    label_names: tuple[str, ...] | None  # hub ClassLabel names (id order); None: regression
    val_files: tuple[str, ...] = ("dev.tsv",)
    hub_val_splits: tuple[str, ...] = ("validation",)
    headerless_columns: tuple[str, ...] | None = None  # CoLA's files have no header row

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns.values() if c != "label")

    @property
    def eval_suffixes(self) -> tuple[str, ...]:
        """Suffix of each validation set's logging prefix: ``""`` for one set, else the hub
        split's qualifier (MNLI: ``_matched``, ``_mismatched``)."""
        if len(self.hub_val_splits) == 1:
            return ("",)
        return tuple(split[len("validation"):] for split in self.hub_val_splits)


_ENTAILMENT = ("entailment", "not_entailment")

# Label ids are the hub's. TSV labels are either those names or the ids themselves.
_TASKS: dict[str, _Task] = {
    "cola": _Task(
        "CoLA",
        {"sentence": "sentence", "label": "label"},
        ("unacceptable", "acceptable"),
        headerless_columns=("source", "label", "original_label", "sentence"),
    ),
    "sst2": _Task("SST-2", {"sentence": "sentence", "label": "label"}, ("negative", "positive")),
    "mrpc": _Task(
        "MRPC",
        {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
        ("not_equivalent", "equivalent"),
    ),
    "qqp": _Task(
        "QQP",
        {"question1": "question1", "question2": "question2", "is_duplicate": "label"},
        ("not_duplicate", "duplicate"),
    ),
    "stsb": _Task("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "score": "label"}, None),
    "mnli": _Task(
        "MNLI",
        {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ("entailment", "neutral", "contradiction"),
        val_files=("dev_matched.tsv", "dev_mismatched.tsv"),
        hub_val_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _Task("QNLI", {"question": "question", "sentence": "sentence", "label": "label"}, _ENTAILMENT),
    "rte": _Task("RTE", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, _ENTAILMENT),
    "wnli": _Task(
        "WNLI",
        {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
        ("not_entailment", "entailment"),
    ),
}

GLUE_TASKS: tuple[str, ...] = tuple(_TASKS)


def _label_parser(names: tuple[str, ...] | None) -> Callable[[str | None], float]:
    """TSV label text -> hub label (class id, or float score); -1 / NaN for a malformed row."""
    if names is None:

        def parse(text: str | None) -> float:
            try:
                return float(text)
            except (TypeError, ValueError):
                return float("nan")

        return parse

    index = {name: i for i, name in enumerate(names)}

    def parse(text: str | None) -> int:
        text = (text or "").strip()
        if text in index:
            return index[text]
        return int(text) if text.isdigit() and int(text) < len(names) else -1

    return parse


class GLUEDataModule(ClassificationDataModule):
    """A GLUE task, from the hub dataset ``nyu-mll/glue`` or from the original GLUE TSV files.

    Label ids are the hub's for both sources (e.g. RTE: entailment=0, not_entailment=1).
    MNLI has two validation sets, matched and mismatched, logged as ``val_matched`` and
    ``val_mismatched``. GLUE test sets carry no labels, so ``test_dataloader`` serves the
    labelled validation set(s) and ``predict_dataloader`` the validation texts (for MNLI the
    matched set), without labels; ``raw_predict`` holds those rows untokenized.

    Args:
        task: GLUE task.
        data_dir: Folder in the original GLUE layout (``<data_dir>/<TASK>/train.tsv``,
            ``dev.tsv``; MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``), e.g. written by the
            GLUE download script. None: the hub dataset ``nyu-mll/glue``.
        predict_split: What ``predict`` reads: ``validation`` (the dev texts), or ``test`` (the
            unlabelled test split, ``<data_dir>/<TASK>/test.tsv`` or the hub's): then ``predict``
            also writes the leaderboard's submission file(s), see
            :mod:`melora_lit.data.glue_submission`.
        max_length: Longest token sequence; longer inputs are truncated.
    """

    def __init__(
        self,
        task: Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"] = "rte",
        data_dir: str | None = None,
        predict_split: Literal["validation", "test"] = "validation",
        max_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, **kwargs)
        if task not in _TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
        self.task = task
        self.data_dir = data_dir
        self.predict_split = predict_split
        self.spec = _TASKS[task]
        self.text_columns = self.spec.text_columns
        self._data: DatasetDict | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for STS-B (regression)."""
        return len(self.spec.label_names) if self.spec.label_names else 1

    @property
    def label_names(self) -> list[str] | None:
        """The hub's class names in id order; None for STS-B."""
        return list(self.spec.label_names) if self.spec.label_names else None

    @property
    def val_names(self) -> list[str]:
        """``["val"]``, or ``["val_matched", "val_mismatched"]`` for MNLI."""
        return [f"val{suffix}" for suffix in self.spec.eval_suffixes]

    @property
    def test_names(self) -> list[str]:
        """``["test"]``, or ``["test_matched", "test_mismatched"]`` for MNLI (the labelled
        validation sets: see :meth:`test_dataloader`)."""
        return [f"test{suffix}" for suffix in self.spec.eval_suffixes]

    def build_metrics(self) -> MetricCollection:
        """A fresh collection of the task's official metrics."""
        return glue_metrics(self.task)

    def prepare_data(self) -> None:
        super().prepare_data()
        if self.data_dir is None:
            self._load_hub()  # download once, before the ranks read the cache

    # ---- reading ------------------------------------------------------------------------

    def _splits(self) -> DatasetDict:
        """Train and validation splits with the hub's column names and label ids (memoised)."""
        if self._data is None:
            self._data = self._load_hub() if self.data_dir is None else self._load_tsv()
        return self._data

    def _load_hub(self) -> DatasetDict:
        try:
            data = load_dataset(GLUE_HUB_DATASET, self.task, cache_dir=self.cache_dir)
        except Exception as err:  # offline, not cached, or any other hub failure
            raise ValueError(
                f"cannot load GLUE task {self.task!r} from the hub ({GLUE_HUB_DATASET}), the hub is "
                f"unreachable or the data not cached ({describe(err)}); pass --data.data_dir with a "
                f"folder of the GLUE TSVs (<data_dir>/{self.spec.folder}/train.tsv, ...)"
            ) from err
        return DatasetDict({split: data[split] for split in ("train", *self.spec.hub_val_splits)})

    def _load_tsv(self) -> DatasetDict:
        spec = self.spec
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            raise ValueError(not_found("GLUE data_dir", root))
        files = {"train": root / spec.folder / "train.tsv"}
        files.update({split: root / spec.folder / name for split, name in zip(spec.hub_val_splits, spec.val_files)})
        for path in files.values():
            if not path.is_file():
                raise ValueError(f"GLUE file not found: {path}")
        usecols = list(spec.columns)
        try:
            raw = load_dataset(
                "csv",
                data_files={split: str(path.resolve()) for split, path in files.items()},
                sep="\t",
                # GLUE texts contain bare '"' characters; quote handling would merge rows.
                quoting=csv.QUOTE_NONE,
                # utf-8-sig strips the byte-order mark that starts MRPC's header.
                encoding="utf-8-sig",
                header=None if spec.headerless_columns else "infer",
                column_names=list(spec.headerless_columns) if spec.headerless_columns else None,
                usecols=usecols,
                # Everything as text: "NA", "null", "nan" are real sentences, not missing values.
                keep_default_na=False,
                features=Features({c: Value("string") for c in usecols}),
                cache_dir=self.cache_dir,
            )
        except Exception as err:  # a missing column or an unreadable file
            raise ValueError(
                f"cannot read the GLUE {spec.folder} TSVs in {root / spec.folder} "
                f"(expected columns {usecols}): {describe(err)}"
            ) from err
        raw = raw.rename_columns({k: v for k, v in spec.columns.items() if k != v})

        parse = _label_parser(spec.label_names)
        text_columns = spec.text_columns

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return {"label": [parse(v) for v in batch["label"]]}

        def well_formed(batch: dict[str, list]) -> list[bool]:
            # A short row leaves its last fields empty: no label, or no second text.
            labels = batch["label"]
            keep = [v == v and v != -1 for v in labels]  # v == v is False for NaN
            for c in text_columns:
                keep = [k and bool(t) for k, t in zip(keep, batch[c])]
            return keep

        data = DatasetDict()
        for split, ds in raw.items():
            ds = ds.map(encode, batched=True, desc="Parsing labels").filter(well_formed, batched=True)
            dropped = raw[split].num_rows - ds.num_rows
            if dropped and not ds.num_rows:  # the warning below would be followed by a cryptic empty-loader error
                wanted = f"one of {', '.join(spec.label_names)}" if spec.label_names else "a number"
                raise ValueError(f"every row of {files[split]} is malformed (no readable label or text): the first "
                                 f"label is {raw[split]['label'][0]!r}, the {spec.folder} labels are {wanted}")
            if dropped:
                rank_zero_warn(f"dropped {dropped} malformed rows of {files[split]}")
            data[split] = ds
        return data

    # ---- splits -------------------------------------------------------------------------

    def _with_labels(self, ds: Dataset) -> Dataset:
        return ds.rename_column("label", "labels")

    def _train_split(self) -> Dataset:
        return self._with_labels(self._splits()["train"])

    def _val_splits(self) -> list[Dataset]:
        return [self._with_labels(self._splits()[s]) for s in self.spec.hub_val_splits]

    def _test_splits(self) -> list[Dataset]:
        return self._val_splits()

    def _data_sources(self) -> dict[str, tuple[list, dict]]:
        spec, task = self.spec, {"task": self.task}
        if self.data_dir is None:  # the hub's splits: their cache files
            sources = {split: [ds] for split, ds in self._splits().items()}
        else:
            folder = Path(self.data_dir) / spec.folder
            sources = {"train": [str(folder / "train.tsv")],
                       **{split: [str(folder / name)] for split, name in zip(spec.hub_val_splits, spec.val_files)}}
        train = (sources["train"], {**task, "max_train_samples": self.max_train_samples, "seed": self.seed})
        vals = {name: (sources[split], task) for name, split in zip(self.val_names, spec.hub_val_splits)}
        return {"train": train, **vals}

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The labelled validation set(s): GLUE test sets carry no labels, so GLUE results are
        validation scores (MNLI: a list, matched then mismatched)."""
        rank_zero_info(f"melora-lit: GLUE test sets carry no labels: `test` reports the labelled dev set(s) of "
                       f"{self.spec.folder} ({', '.join(self.spec.val_files)})")
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation texts (MNLI: the matched set), or with ``predict_split="test"`` the test
        texts, without labels; the rows are in ``raw_predict``."""
        return super().predict_dataloader()

    def submission_writer(self) -> SubmissionWriter | None:
        """The leaderboard's files when a test split is predicted (its rows name their file)."""
        columns = getattr(self.raw_predict, "column_names", None) or ()
        return GLUESubmission() if self.predict_split == "test" and SUBMISSION_COLUMN in columns else None

    def _predict_split(self) -> Dataset:
        if self.predict_split == "test":
            return glue_test_split(self.task, self.data_dir, self.cache_dir)
        dev = self._splits()[self.spec.hub_val_splits[0]]
        names = self.spec.label_names
        if names is None:
            return dev
        # the dev labels by name, as `predict` writes its predictions
        features = dev.features.copy()
        features["label"] = Value("string")
        return dev.map(lambda batch: {"label": [names[i] for i in batch["label"]]}, batched=True, features=features)
