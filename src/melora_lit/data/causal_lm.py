"""Causal-LM data: :class:`CausalLMDataModule` reads records (a file, a hub dataset, or a
subclass's own), holds out the validation split, tokenizes each record through an **encoder**,
drops the records it cannot train on (counted by reason in :attr:`CausalLMDataModule.dropped`),
groups by length, packs, collates and serves generation examples.

An encoder (:class:`Encoder`) knows one kind of record: it turns the rows of a file into
normalized records and one record into token ids and labels, or raises :class:`Rejected` naming
why not. Two sit side by side: :class:`~melora_lit.data.instruction.PromptEncoder` (Alpaca
records in a prompt format) and :class:`~melora_lit.data.chat.ChatTemplateEncoder` (conversations
through a chat template).
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from datasets import Dataset, load_dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..errors import check_utf8, data_file_error, describe
from ..loading import ResumableSampler
from ..metrics import language_modeling_metrics
from .base import DataTask, MELoRADataModule, check_val_size, data_file
from .packing import IGNORE_INDEX, PackedCollator, pack_dataset

__all__ = ["IGNORE_INDEX", "RECORD_FORMATS", "CausalLMDataModule", "Encoder", "LengthGroupedSampler", "Rejected",
           "Rows"]

# record file types: extension -> datasets builder
RECORD_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Rows as read: a Dataset, or JSON rows read one by one (an encoder with ``reads_rows``: a row of
# odd types is then a bad record, not a file Arrow refuses)
Rows = Union[Dataset, list]


class Rejected(ValueError):
    """A record that cannot be used: ``kind`` names the reason (the key of the drop counts), the
    message says where."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind + detail)
        self.kind = kind


class LengthGroupedSampler(ResumableSampler):
    """Indices in a seeded random order in which neighbours have similar lengths.

    Each epoch: a random permutation, cut into mega-batches of ``batch_size * mega_batch_mult``
    indices, each sorted by length, longest first (so batches pad little); the mega-batch that
    holds the longest example goes first, so a too-large batch fails at the first step. The
    order changes every epoch and is the same for the same seed and epoch; several processes
    share it, and a resumed run continues it mid-epoch
    (:class:`~melora_lit.loading.ResumableSampler`).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 42, mega_batch_mult: int = 50,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batch_mult = mega_batch_mult
        super().__init__(self.lengths, seed, num_replicas, rank)

    def epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = max(self.batch_size * self.mega_batch_mult, 1)
        megas = [sorted(perm[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(perm), size)]
        if megas:
            first = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
            megas[0], megas[first] = megas[first], megas[0]
        return [i for mega in megas for i in mega]


class Encoder(ABC):
    """One kind of record, for one tokenizer: rows -> records (:meth:`records`), a record -> its
    token ids and labels (:meth:`encode`) or its prompt (:meth:`prompt`)."""

    reads_rows: ClassVar[bool] = False  # JSON files read row by row (see Rows)
    too_long: ClassVar[str]  # the drop reason of a record with nothing to learn within max_length
    dropped_line: ClassVar[str]  # logged: {split} {n} {total} {max_length}
    none_left_line: ClassVar[str]  # the error when no record is left: {split} {max_length}

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    @abstractmethod
    def records(self, rows: Rows, source: str, with_output: bool = True) -> tuple[Dataset, dict[str, list[int]]]:
        """The normalized records of ``rows`` (read from ``source``), and the numbers (from 1) of
        the rows left out, by reason; ``with_output``: training records (else prompts)."""

    @abstractmethod
    def encode(self, record: dict[str, Any], with_labels: bool = True) -> dict[str, list[int]]:
        """``input_ids``, ``attention_mask`` and (``with_labels``) ``labels`` of a record, or only
        its prompt's ids; raises :class:`Rejected`."""

    @abstractmethod
    def prompt(self, record: dict[str, Any]) -> str:
        """The prompt text of a record, ending where the reply begins."""

    @abstractmethod
    def from_lines(self, lines: list[str]) -> Dataset:
        """Records to answer, one user message per line (a ``.txt`` predict file)."""

    def prompts(self, ds: Dataset) -> Dataset:
        """``predict``'s rows of records: each as the prompt to answer."""
        return ds

    @abstractmethod
    def examples(self, ds: Dataset) -> Dataset:
        """Generation examples of records: the prompt (``messages``, also the columns ``encode``
        reads), the reply it should get (``reference``) and the ``record`` number."""

    def check(self, record: dict[str, Any]) -> None:
        """Raise a one-line ValueError if this encoder cannot encode records like ``record``."""

    def encode_batch(self, records: dict[str, list], with_labels: bool = True) -> dict[str, list]:
        """:meth:`encode` over the records of a batch (columns), without the rejected ones."""
        out: dict[str, list] = {}
        for i in range(len(next(iter(records.values())))):
            try:
                encoded = self.encode({k: v[i] for k, v in records.items()}, with_labels)
            except Rejected:
                continue
            for k, v in encoded.items():
                out.setdefault(k, []).append(v)
        return out or {"input_ids": [], "attention_mask": [], **({"labels": []} if with_labels else {})}


class CausalLMDataModule(MELoRADataModule):
    """The shared base of the causal-LM data modules (see the module docstring).

    Without a validation file, a seeded ``val_size`` of the train records is held out. Batches
    are padded to their longest sequence (labels with -100), on the right for training and on the
    left for ``predict``, whose batches hold the prompts only, for generation. A tokenizer without
    a pad token pads with its EOS token. ``test`` reports the validation records.

    Args:
        predict_file: Records to answer with ``predict`` (a ``.txt`` file: one user message per line).
        system_prompt: System message for records that have none (default: the template's own).
        train_on_inputs: Also put the loss on the prompt tokens.
        val_size: Records held out for validation when there is no validation file: a number of
            records (int) or a fraction (float in (0, 1)).
        group_by_length: Batch training records of similar length together (seeded, in shuffled
            mega-batches of 50 batches), which saves padding.
        batch_size: Train batch size (rows, with packing).
    """

    model_task: ClassVar[DataTask] = "causal-lm"
    # where the records come from: a file or a hub dataset (see _set_source), else the subclass's own
    train_file: str | None = None
    validation_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    packing: bool = False
    bad_records: str = "drop"

    def __init__(
        self,
        predict_file: str | None = None,
        system_prompt: str | None = None,
        train_on_inputs: bool = False,
        val_size: int | float = 0.05,
        group_by_length: bool = False,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        check_val_size(val_size)
        if predict_file is not None and Path(predict_file).suffix.lower() not in (*RECORD_FORMATS, ".txt"):
            raise ValueError(f"unsupported predict file type {Path(predict_file).suffix or '(no extension)'!r}; "
                             f"use one of {', '.join(RECORD_FORMATS)}, .txt")
        self.predict_file = predict_file
        self.system_prompt = system_prompt
        self.train_on_inputs = train_on_inputs
        self.val_size = val_size
        self.group_by_length = group_by_length
        self.dropped: dict[str, Counter] = {}  # split or file -> records left out, by reason
        self._fit_splits: tuple[Dataset, Dataset] | None = None
        self._encoder: Encoder | None = None
        self._prompt_tokenizer: PreTrainedTokenizerBase | None = None

    def _set_source(self, train_file: str | None, validation_file: str | None, dataset_name: str | None,
                    dataset_config_name: str | None, dataset_split: str) -> None:
        """Records from files or a hub dataset (the subclasses that read them have these options)."""
        if dataset_name is not None and train_file is not None:
            raise ValueError(f"pass either dataset_name ({dataset_name!r}) or train_file, not both")
        for path in (train_file, validation_file):
            if path is not None and Path(path).suffix.lower() not in RECORD_FORMATS:
                raise ValueError(f"unsupported data file type {Path(path).suffix or '(no extension)'!r} for {path}; "
                                 f"use one of {', '.join(RECORD_FORMATS)}")
        self.train_file, self.validation_file = train_file, validation_file
        self.dataset_name, self.dataset_config_name = dataset_name, dataset_config_name
        self.dataset_split = dataset_split

    # ---- the contract (melora_lit.data.base) ------------------------------------------------

    @property
    def num_labels(self) -> None:
        """None: a causal LM predicts tokens, not classes."""
        return None

    @property
    def label_names(self) -> None:
        """None: no classes."""
        return None

    def build_metrics(self) -> MetricCollection:
        """Token-weighted ``loss`` and ``perplexity`` (see :func:`~melora_lit.metrics.language_modeling_metrics`)."""
        return language_modeling_metrics()

    # ---- the encoder ----------------------------------------------------------------------

    @abstractmethod
    def _make_encoder(self, tokenizer: PreTrainedTokenizerBase) -> Encoder:
        """This module's encoder, with its settings."""

    @property
    def encoder(self) -> Encoder:
        """Turns rows into records and records into token ids and labels with this module's settings."""
        if self._encoder is None:
            self._encoder = self._make_encoder(self._load_tokenizer())
        return self._encoder

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = super()._load_tokenizer()
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError(f"tokenizer {self.tokenizer_name!r} has neither a pad nor an EOS token")
                tokenizer.pad_token = tokenizer.eos_token
                rank_zero_info(f"tokenizer {self.tokenizer_name!r} has no pad token: padding with its EOS "
                               f"token {tokenizer.eos_token!r} (padding is masked out of attention and loss)")
            if tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer {self.tokenizer_name!r} has no EOS token to end responses with")
            self._check_tokenizer(tokenizer)
            tokenizer.padding_side = "right"
            self._tokenizer = tokenizer
        return self._tokenizer

    def _check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse (or adapt) a tokenizer this module's encoder cannot use."""

    # ---- reading --------------------------------------------------------------------------

    def _read_records(self, path: str) -> Rows:
        file = data_file(path)
        if file.suffix.lower() != ".parquet":
            check_utf8(path)  # the JSON reader would take other bytes silently
        if self.encoder.reads_rows and file.suffix.lower() in (".json", ".jsonl"):
            return _json_rows(path, file.read_text(encoding="utf-8"), file.suffix.lower() == ".json")
        try:
            ds = load_dataset(RECORD_FORMATS[file.suffix.lower()], data_files=str(file.resolve()),
                              split="train", cache_dir=self.cache_dir)
        except Exception as err:  # parser errors come wrapped in several types
            if "corresponds to no data" in str(err):
                raise ValueError(f"{path} has no rows") from err
            raise ValueError(data_file_error(path, err)) from err
        if len(ds) == 0:
            raise ValueError(f"{path} has no rows")
        return ds

    def _read_lines(self, path: str) -> list[str]:
        """The non-empty lines of a ``.txt`` file."""
        file = data_file(path)
        check_utf8(path)
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError(f"{path} has no instructions")
        return lines

    def _read_hub(self) -> Dataset:
        try:
            return load_dataset(self.dataset_name, self.dataset_config_name, split=self.dataset_split,
                                cache_dir=self.cache_dir)
        except Exception as err:  # the hub raises many types; all mean "cannot get it"
            raise ValueError(f"cannot load dataset {self.dataset_name!r} split {self.dataset_split!r}: "
                             f"{describe(err)}") from err

    def _read_train(self) -> Rows:
        """The train rows as read; subclasses with their own data override this."""
        if self.train_file is not None:
            return self._read_records(self.train_file)
        if self.dataset_name is not None:
            return self._read_hub()
        raise ValueError("no train data: pass --data.train_file or --data.dataset_name")

    def _describe_train(self) -> str:
        if self.train_file is not None:
            return self.train_file
        return f"dataset {self.dataset_name!r} split {self.dataset_split!r}"

    def _records(self, rows: Rows, source: str, with_output: bool = True) -> Dataset:
        """The encoder's records of ``rows``; the rows it leaves out are counted under ``source``
        (and named in a warning), or refused with ``bad_records: error``."""
        ds, reasons = self.encoder.records(rows, source, with_output)
        if reasons or self.encoder.reads_rows:
            self.dropped[source] = Counter({r: len(n) for r, n in reasons.items()})
        dropped = sum(map(len, reasons.values()))
        if dropped:
            detail = ", ".join(f"{len(n)} {r} (first: record {n[0]})" for r, n in sorted(reasons.items()))
            rank_zero_warn(f"{source}: dropped {dropped} bad records of {dropped + len(ds)}: {detail}; "
                           "bad_records: error stops at the first instead")
        return ds

    def _fit(self) -> tuple[Dataset, Dataset]:
        if self._fit_splits is None:
            train = self._records(self._read_train(), self._describe_train())
            if self.validation_file is not None:
                val = self._records(self._read_records(self.validation_file), self.validation_file)
            else:
                size = self.val_size
                if isinstance(size, int) and size >= len(train):
                    raise ValueError(f"val_size={size} leaves no train records of {len(train)}")
                parts = train.train_test_split(test_size=size, seed=self.seed)
                train, val = parts["train"], parts["test"]
            self._fit_splits = (train, val)
        return self._fit_splits

    def _train_split(self) -> Dataset:
        return self._fit()[0]

    def _val_splits(self) -> list[Dataset]:
        return [self._fit()[1]]

    def _test_splits(self) -> list[Dataset]:
        return self._val_splits()

    def _predict_split(self) -> Dataset:
        if self.predict_file is None:
            return self.encoder.prompts(self._val_splits()[0])
        if self.predict_file.lower().endswith(".txt"):
            return self.encoder.prompts(self.encoder.from_lines(self._read_lines(self.predict_file)))
        rows = self._read_records(self.predict_file)
        return self.encoder.prompts(self._records(rows, self.predict_file, with_output=False))

    def _record_settings(self) -> dict[str, Any]:
        """The settings that decide what a record holds."""
        return {}

    def _train_source(self) -> tuple[list[Any], dict[str, Any]]:
        """Where the train records are read from, and the settings that choose them."""
        if self.train_file is not None:
            return [self.train_file], {}
        return [self._read_hub()], {"dataset": self.dataset_name, "config": self.dataset_config_name,
                                    "split": self.dataset_split}

    def _data_sources(self) -> dict[str, tuple[list[Any], dict[str, Any]]]:
        sources, settings = self._train_source()
        settings = {**self._record_settings(), **settings, "seed": self.seed}
        train = {**settings, "max_train_samples": self.max_train_samples}
        if self.validation_file is not None:
            return {"train": (sources, train), "val": ([self.validation_file], self._record_settings())}
        split = {"val_size": self.val_size}
        return {"train": (sources, {**train, **split}), "val": (sources, {**settings, **split, "held_out_of": "train"})}

    # ---- tokens ---------------------------------------------------------------------------

    def _tokenize(self, ds: Dataset, with_labels: bool = True, split: str = "train") -> Dataset:
        """Token ids (and labels) of records; those the encoder rejects are left out and counted
        under ``split`` in :attr:`dropped` (with labels, also those with nothing to learn within
        ``max_length``), or refused with ``bad_records: error``."""
        encoder, bad_records = self.encoder, self.bad_records
        if with_labels and len(ds):
            encoder.check(ds[0])
        keys = ["input_ids", "attention_mask", "labels"][:3 if with_labels else 2]
        first_column = ds.column_names[0]

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {k: [] for k in [*keys, "rejected", "why"]}
            for i in range(len(batch[first_column])):
                record = {k: v[i] for k, v in batch.items()}
                try:
                    encoded, why = encoder.encode(record, with_labels), None
                except Rejected as err:
                    if err.kind != encoder.too_long and bad_records == "error":
                        raise ValueError(f"{split} record {record.get('record')}: {err} (bad_records: drop skips "
                                         "such records)") from None
                    encoded, why = {k: [] for k in keys}, err
                for k in keys:
                    out[k].append(encoded[k])
                out["rejected"].append(why.kind if why else "")
                out["why"].append(str(why) if why else "")
            return out

        # the reasons are a column, so a tokenization read back from the datasets cache counts them too
        tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")
        kinds = tokenized["rejected"]
        reasons = Counter(k for k in kinds if k)
        refused = sum(n for k, n in reasons.items() if k != encoder.too_long)
        if reasons:
            first = next((w for k, w in zip(kinds, tokenized["why"]) if k and k != encoder.too_long), None)
            tokenized = tokenized.filter(lambda k: not k, input_columns="rejected")
        tokenized = tokenized.remove_columns(["rejected", "why"])
        if with_labels or refused:
            self.dropped[split] = reasons
        if refused:
            rank_zero_warn(f"{split}: dropped {refused} records that the chat template refused "
                           f"(the first: {first})")
        if with_labels:
            if reasons[encoder.too_long]:
                rank_zero_info(encoder.dropped_line.format(split=split, n=reasons[encoder.too_long], total=len(ds),
                                                           max_length=self.max_length))
            if len(tokenized) == 0:
                raise ValueError(encoder.none_left_line.format(split=split, max_length=self.max_length))
        return tokenized

    def prepare_stage(self, stage: str | None = None) -> None:
        super().prepare_stage(stage)
        if self.packing:
            if stage in ("fit", None):
                self.train_dataset = pack_dataset(self.train_dataset, self.max_length, self.seed)
            if stage in ("fit", "validate", None):
                self.val_datasets = [pack_dataset(ds, self.max_length, self.seed) for ds in self.val_datasets]
            if stage in ("test", None):
                self.test_datasets = [pack_dataset(ds, self.max_length, self.seed) for ds in self.test_datasets]

    # ---- batches --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Training batches: seeded shuffle (or length grouping), right-padded, labels padded -100."""
        ds = self._ready(self.train_dataset, "fit")
        if not self.group_by_length:
            return self._loader(ds, self.batch_size, shuffle=True)
        lengths = [len(x) for x in ds["input_ids"]]
        sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        return self._loader(ds, self.batch_size, sampler=sampler)

    def _left_padding(self) -> DataCollatorWithPadding:
        """Pads prompts on the left, for generation."""
        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = copy.deepcopy(self._load_tokenizer())
            self._prompt_tokenizer.padding_side = "left"
        return DataCollatorWithPadding(self._prompt_tokenizer)

    def predict_dataloader(self) -> DataLoader:
        """Prompt batches, left-padded for generation, in the order of :attr:`raw_predict`."""
        return self._loader(self._ready(self.predict_dataset, "predict"), self.eval_batch_size,
                            collate_fn=self._left_padding())

    def _collator(self) -> Any:
        if self.packing:
            return PackedCollator(self._load_tokenizer().pad_token_id)
        return DataCollatorForSeq2Seq(self._load_tokenizer(), padding=True, label_pad_token_id=IGNORE_INDEX)

    def generation_examples(self, limit: int | None = None) -> tuple[Dataset, DataLoader]:
        """The first ``limit`` validation records as prompts with their reference reply (a
        dataset with the prompt record and ``reference``), and a loader of their left-padded
        prompt ids, in the same order, for generation."""
        val = self._val_splits()[0]
        if limit is not None and limit < len(val):
            val = val.select(range(limit))
        raw = self.encoder.examples(val)
        ids = self._tokenize(raw, with_labels=False, split="generation")
        return raw, DataLoader(ids, batch_size=self.eval_batch_size, collate_fn=self._left_padding())


def _json_rows(path: str, text: str, whole: bool) -> list:
    """The rows of a JSON list (``whole``, a ``.json`` file that starts with ``[``) or of JSON lines."""
    if whole and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot read {path}: line {err.lineno}, column {err.colno} is not valid JSON "
                             f"({err.msg})") from None
    else:
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
            try:
                if line.strip():
                    rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"cannot read {path}: line {number} is not a JSON record ({err.msg}"
                                 f"{'' if err.msg.endswith(' at') else ' at'} column {err.colno})") from None
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows
