"""What :class:`~melora_lit.training.module.MELoRAModule` needs from a data module, written down
once: :class:`MELoRADataModule`. Every data module of this package implements it.

The contract (abstract members must be provided by a subclass):

=====================  ==========================================================================
``model_task``         the ``--model.task`` this data trains: ``sequence-classification`` or
                       ``causal-lm``; the module refuses data of another task before training.
``num_labels``         output size of a classifier (classes; 1 = regression), None for data
                       without classes (causal LM). The CLI links it to ``model.num_labels``.
``label_names``        class names in id order, or None (regression, causal LM). Linked to
                       ``model.label_names``.
``val_names``          logging prefix of each validation dataloader, in order (``["val"]``).
``test_names``         logging prefix of each test dataloader, in order (``["test"]``).
``build_metrics()``    a fresh ``MetricCollection`` for this data (keys without prefix).
``tokenizer``          the tokenizer the batches were made with (pad token set).
``raw_predict``        the untokenized rows of ``predict_dataloader``, in order (after setup).
``data_fingerprint()`` what the training data and each validation set are: their files' sizes and
                       sha256, rows and split settings (after ``setup("fit")``); recorded in
                       every checkpoint ``fit`` writes, a resume on other data is refused.
``submission_writer()`` what ``predict`` writes besides the predictions file, a
                       :class:`SubmissionWriter` (GLUE's leaderboard files), or None (the default).
=====================  ==========================================================================

A subclass also provides the untokenized splits (``_train_split``, ``_val_splits``,
``_test_splits``, ``_predict_split``), where the training and validation rows come from
(``_data_sources``) and how rows become token ids (``_tokenize``); this base
turns them into dataloaders through ONE loader-building method, :meth:`MELoRADataModule._loader`.
:class:`ClassificationDataModule` is the shared base of the classification data modules (texts in
``text_columns``, class ids or scores in ``labels``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Protocol

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..errors import describe, not_found, offline_hint
from ..fingerprint import source_fingerprint
from ..loading import ResumableDataLoader, ResumableRandomSampler, ResumableSampler
from ..metrics import classification_metrics, regression_metrics
from ..run import worker_init
from ..sources import position_limit, resolve_pretrained

__all__ = ["DataTask", "MELoRADataModule", "ClassificationDataModule", "SubmissionWriter", "check_int",
           "check_val_size", "data_file", "renamed", "seeded_subset"]

DataTask = Literal["sequence-classification", "causal-lm"]


def seeded_subset(records: list, size: int | None, seed: int) -> list:
    """``size`` of ``records`` drawn with ``seed``, in their original order (all when ``size`` is None)."""
    if size is None or size >= len(records):
        return records
    keep = sorted(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:size].tolist())
    return [records[i] for i in keep]


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """Raise a one-line ValueError unless ``value`` is an integer >= ``minimum`` (or None if optional)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def data_file(path: str) -> Path:
    """``path`` as a data file that exists and is not empty; a one-line ValueError otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(not_found("data file", path))
    if file.stat().st_size == 0:
        raise ValueError(f"data file is empty: {path}")
    return file


def check_val_size(value: Any, fraction_only: bool = False) -> None:
    """Raise a one-line ValueError unless ``value`` is a fraction in (0, 1) or (unless
    ``fraction_only``) a number of records >= 1."""
    if fraction_only:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"val_size must be between 0 and 1 (exclusive), got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"val_size must be a number of records or a fraction, got {value!r}")
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(f"val_size={value} is not valid; a fraction must be in (0, 1)")
    if isinstance(value, int):
        check_int("val_size", value, minimum=1)


def renamed(old: str, old_value: Any, new: str, value: Any, default: Any) -> Any:
    """The value of option ``new`` when it may also be given under its deprecated name ``old``
    (None: not given): that name is taken with a one-line warning; both given is an error."""
    if old_value is None:
        return value
    if value != default:
        raise ValueError(f"{old}={old_value!r} and {new}={value!r} are the same setting ({old} is the old name of "
                         f"{new}); pass {new} only")
    rank_zero_info(f"melora-lit: {old} is deprecated: use {new}, its new name")  # one line, as the CLI's notices
    return old_value


class SubmissionWriter(Protocol):
    """Files a data module makes of ``predict``'s rows besides the predictions file (a benchmark's
    leaderboard files: :class:`~melora_lit.data.glue_submission.GLUESubmission`); the prediction
    writer checks their folder before predicting and has them written into it."""

    name: str  #: what they are, in messages (``GLUE``)
    folder: str  #: the folder's default name, beside the predictions file

    def write(self, rows: list[dict[str, Any]], folder: Path, label_names: list[str] | None) -> list[Path]:
        """Write the files of ``rows`` (the predictions file's) into ``folder``, whole or not at all;
        the paths written."""
        ...


class MELoRADataModule(L.LightningDataModule, ABC):
    """The data side of a MELoRA run (see the module docstring for the contract), with the
    tokenizer, set-up and dataloader plumbing every data module shares."""

    model_task: ClassVar[DataTask]

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        """The loader settings every data module shares, declared here only: a subclass takes its
        own options and ``**kwargs`` passed on here (LightningCLI's ``--help`` and
        ``--print_config`` follow them into this signature), and declares again only an option
        whose default differs.

        Args:
            tokenizer: Tokenizer hub name or local path (the CLI links the model's here).
            max_length: Longest token sequence; longer inputs are truncated.
            batch_size: Train batch size.
            eval_batch_size: Batch size for validation, test and predict (default: batch_size).
            max_train_samples: Train on a seeded random subset of this many examples.
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split, the train subset and the train order.
            cache_dir: Folder for the datasets cache (default: the Hugging Face datasets cache).
        """
        super().__init__()
        check_int("max_length", max_length)
        check_int("batch_size", batch_size)
        check_int("eval_batch_size", eval_batch_size, optional=True)
        check_int("max_train_samples", max_train_samples, optional=True)
        check_int("num_workers", num_workers, minimum=0)
        # Plain attributes rather than save_hyperparameters(): Lightning refuses to log when a
        # datamodule hparam and a model hparam share a key with different values, and the
        # LightningCLI already saves the full config next to the logs.
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_train_samples = max_train_samples
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: Dataset | None = None
        self.val_datasets: list[Dataset] = []
        self.test_datasets: list[Dataset] = []
        self.predict_dataset: Dataset | None = None
        self.raw_predict: Dataset | None = None
        self._rows: dict[str, int] = {}  # untokenized rows of train and each validation set

    # ---- the contract -------------------------------------------------------------------

    @property
    @abstractmethod
    def num_labels(self) -> int | None:
        """Output size of a classifier (1 = regression); None for data without classes."""

    @property
    @abstractmethod
    def label_names(self) -> list[str] | None:
        """Class names in class-id order; None for regression and for data without classes."""

    @property
    def val_names(self) -> list[str]:
        """Logging prefixes of the validation dataloaders, in order."""
        return ["val"]

    @property
    def test_names(self) -> list[str]:
        """Logging prefixes of the test dataloaders, in order."""
        return ["test"]

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """A fresh metric collection for this data (see :mod:`melora_lit.metrics`)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer the batches are made with, loaded on first use."""
        return self._load_tokenizer()

    def data_fingerprint(self) -> dict[str, dict[str, Any]]:
        """What ``train`` and each of :attr:`val_names` hold (after ``setup("fit")``): ``files``
        (path, size and sha256 of each file read: :mod:`melora_lit.fingerprint`), ``rows`` (before
        tokenization) and ``settings`` (those that choose the rows: split fraction and seed,
        subsets, task)."""
        return {split: {"files": [fp for source in sources for fp in source_fingerprint(source)],
                        "rows": self._rows.get(split), "settings": settings}
                for split, (sources, settings) in self._data_sources().items()}

    def submission_writer(self) -> SubmissionWriter | None:
        """What ``predict`` writes besides the predictions file (after ``setup("predict")``)."""
        return None

    # ---- what a subclass provides -------------------------------------------------------

    @abstractmethod
    def _train_split(self) -> Dataset: ...

    @abstractmethod
    def _val_splits(self) -> list[Dataset]: ...

    @abstractmethod
    def _test_splits(self) -> list[Dataset]: ...

    @abstractmethod
    def _predict_split(self) -> Dataset: ...

    @abstractmethod
    def _data_sources(self) -> dict[str, tuple[list[Any], dict[str, Any]]]:
        """``{split: (sources, settings)}`` for ``train`` and each of :attr:`val_names`: the files
        or folders (or hub ``Dataset``: its cache files) its rows are read from, and the settings
        that choose which rows it holds."""

    @abstractmethod
    def _tokenize(self, ds: Dataset, with_labels: bool = True, split: str = "train") -> Dataset:
        """Token ids (and ``labels`` if ``with_labels``) of the rows of ``split``."""

    def _collator(self) -> Callable:
        return DataCollatorWithPadding(self._load_tokenizer())

    # ---- Lightning hooks ----------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs on one process per node: download the tokenizer once before every rank loads it.
        self._load_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Lightning's hook: each stage's data is prepared once (:meth:`prepare_stage`), so the CLI
        can read and check it before anything is written and Lightning's call reuses it."""
        done = self.__dict__.setdefault("_prepared_stages", set())
        if (stage or "all") not in done:
            self.prepare_stage(stage)
            done.add(stage or "all")

    def prepare_stage(self, stage: str | None = None) -> None:
        """Read, split and tokenize the data of ``stage`` (all stages for None)."""
        self._load_tokenizer()  # a bad tokenizer fails before any data is read
        if stage in ("fit", None):
            train = self._train_split()
            if self.max_train_samples is not None and self.max_train_samples < len(train):
                train = train.shuffle(seed=self.seed).select(range(self.max_train_samples))
            self._rows["train"] = len(train)
            self.train_dataset = self._tokenize(train, split="train")
        if stage in ("fit", "validate", None):
            vals = self._val_splits()
            self._rows.update(zip(self.val_names, map(len, vals)))
            self.val_datasets = [self._tokenize(ds, split="val") for ds in vals]
        if stage in ("test", None):
            tests = self._test_splits()
            if stage == "test" and any(t is v for t in tests for v in self._val_splits()):
                # no test split of its own: say so, the numbers are logged as test/*
                rank_zero_info(f"melora-lit: {type(self).__name__} has no test split here: test reports the "
                               f"validation split, logged as {', '.join(n + '/*' for n in self.test_names)}")
            self.test_datasets = [self._tokenize(ds, split="test") for ds in tests]
        if stage in ("predict", None):
            self.raw_predict = self._predict_split()
            self.predict_dataset = self._tokenize(self.raw_predict, with_labels=False, split="predict")

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches (seeded), padded to their longest sequence."""
        return self._loader(self._ready(self.train_dataset, "fit"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per validation set, named by :attr:`val_names` (a list when several)."""
        loaders = [self._loader(ds, self.eval_batch_size) for ds in self._ready(self.val_datasets, "validate")]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """Labelled test batches, named by :attr:`test_names` (a list when several)."""
        loaders = [self._loader(ds, self.eval_batch_size) for ds in self._ready(self.test_datasets, "test")]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader:
        """Unlabelled batches, in the order of the rows of :attr:`raw_predict`."""
        return self._loader(self._ready(self.predict_dataset, "predict"), self.eval_batch_size)

    # ---- plumbing -----------------------------------------------------------------------

    @staticmethod
    def _ready(data: Any, stage: str) -> Any:
        if data is None or (isinstance(data, list) and not data):
            raise RuntimeError(f"the {stage} data is not set up: call setup({stage!r}) first")
        return data

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError(
                    "tokenizer is not set: pass --data.tokenizer (a hub name or local path) "
                    "or link it from the model's model_name_or_path"
                )
            source = resolve_pretrained(self.tokenizer_name)  # its errors are one line already
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot load tokenizer {self.tokenizer_name!r}{offline_hint(err)}: "
                                 f"{describe(err)}") from err
            # longer sequences than the model has positions fail deep in its forward
            limit = position_limit(self.tokenizer_name, tokenizer)
            if limit is not None and self.max_length > limit:
                raise ValueError(f"data.init_args.max_length={self.max_length} is more than the model's {limit} token "
                                 f"positions (max_position_embeddings); use a max_length of at most {limit}")
            # shorter than the special tokens, every text would be cut to nothing, silently
            pair = len(getattr(self, "text_columns", ()) or ()) == 2
            specials = tokenizer.num_special_tokens_to_add(pair=pair)
            if self.max_length < specials + 1 + pair:
                added = "" if pair else f" ({', '.join(tokenizer.convert_ids_to_tokens(tokenizer('')['input_ids']))})"
                raise ValueError(f"data.init_args.max_length={self.max_length} leaves no room for text: the tokenizer "
                                 f"adds {specials} special tokens{added} to every {'text pair' if pair else 'text'}; "
                                 f"use a max_length of at least {specials + 1 + pair}")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool = False,
                sampler: ResumableSampler | None = None, collate_fn: Callable | None = None) -> DataLoader:
        """The one place where this package builds a DataLoader."""
        # The train order (``shuffle``, or a given resumable ``sampler``) is a function of (seed,
        # epoch) and the loader's position is saved in checkpoints, so a run resumed mid-epoch
        # sees exactly the batches it had not seen. The loader's own seeded generator keeps it
        # from drawing on the global torch RNG (dropout's): an extra draw there at each epoch
        # start would make a resumed run differ.
        if shuffle and sampler is None:
            sampler = ResumableRandomSampler(ds, self.seed)
        return (ResumableDataLoader if sampler is not None else DataLoader)(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate_fn if collate_fn is not None else self._collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=worker_init(),  # workers ignore a process group's SIGTERM/SIGUSR1/SIGINT
        )


class ClassificationDataModule(MELoRADataModule):
    """Shared base of the classification data modules: the texts of :attr:`text_columns` (one
    text, or a pair) tokenized together; class ids (or regression scores) in a ``labels``
    column."""

    model_task: ClassVar[DataTask] = "sequence-classification"
    text_columns: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        """Whether the target is a float score rather than a class id."""
        return self.num_labels == 1

    def build_metrics(self) -> MetricCollection:
        """Pearson and Spearman for regression, else ``accuracy`` and macro ``f1``."""
        return regression_metrics() if self.is_regression else classification_metrics(self.num_labels)

    def _tokenize(self, ds: Dataset, with_labels: bool = True, split: str = "train") -> Dataset:
        """Token ids of the text columns (pairs for two columns), plus ``labels`` if kept.

        No padding here: :class:`~transformers.DataCollatorWithPadding` pads each batch to its
        own longest sequence. Datasets backed by cache files reuse the tokenized result.
        """
        tokenizer = self._load_tokenizer()
        columns, max_length = self.text_columns, self.max_length

        def encode(batch: dict[str, list]) -> dict[str, list]:
            # An empty cell (None) is an empty text, not a reason to crash the tokenizer.
            texts = [["" if t is None else str(t) for t in batch[c]] for c in columns]
            return tokenizer(*texts, truncation=True, max_length=max_length)

        keep = {"labels"} if with_labels else set()
        return ds.map(
            encode,
            batched=True,
            remove_columns=[c for c in ds.column_names if c not in keep],
            desc="Tokenizing",
        )
