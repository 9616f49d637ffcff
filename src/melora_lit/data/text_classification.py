"""Text classification data from a user's own files or a hub dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..errors import check_utf8, data_file_error, describe
from .base import ClassificationDataModule, check_val_size, data_file, renamed

__all__ = ["TextClassificationDataModule"]

# file extension -> (datasets packaged builder, builder options)
_FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    # Only empty cells count as missing: pandas' default NA strings ("NA", "null", "None", ...)
    # are legitimate texts and labels.
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    ".tsv": ("csv", {"sep": "\t", "keep_default_na": False, "na_values": [""]}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def _label_names_from_values(values: list[Any], source: str, column: str) -> list[str]:
    """Class names from the distinct labels of the train data.

    Strings: sorted. Integers: sorted numerically and named by their decimal text, so class ids
    0..K-1 keep their ids.
    """
    if any(v is None for v in values):
        raise ValueError(f"{source} has rows with an empty {column!r} label")
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    odd = next(v for v in values if not isinstance(v, (str, int)) or isinstance(v, bool))
    raise ValueError(
        f"{source} has a {type(odd).__name__} label {odd!r} in column {column!r}; "
        "labels must be class names (strings) or integer class ids"
    )


def _distinct_labels(ds: Dataset, column: str, source: str) -> list[Any]:
    """The distinct values of a label column; a one-line error naming the file and the values
    when they are not one kind of scalar (lists, records, or integers mixed with strings)."""
    if isinstance(ds.features[column], (Value, ClassLabel)):
        return ds.unique(column)
    values = ds[column]  # a JSON column of lists, records or mixed kinds, as Python values
    bad = next((i for i, v in enumerate(values) if not isinstance(v, (str, int)) or isinstance(v, bool)), None)
    if bad is not None:
        raise ValueError(f"{source} has a {type(values[bad]).__name__} label {values[bad]!r} in column {column!r} "
                         f"(row {bad + 1}); labels must be class names (strings) or integer class ids")
    first_int = next((i for i, v in enumerate(values) if isinstance(v, int)), None)
    first_str = next((i for i, v in enumerate(values) if isinstance(v, str)), None)
    if first_int is None or first_str is None:
        return list(dict.fromkeys(values))
    raise ValueError(f"{source} mixes integer and string labels in column {column!r} ({values[first_int]!r} in row "
                     f"{first_int + 1}, {values[first_str]!r} in row {first_str + 1}); use class names or class ids, "
                     "not both")


def _label_encoder(names: list[str]) -> Callable[[Any], int | None]:
    """Maps a label value to its class id, or None when it is not a known label.

    Strings match by name. Integers match by name when the names are numbers ("1".."5"), else
    they are class ids (0 is ``names[0]``).
    """
    index = {name: i for i, name in enumerate(names)}
    numeric_names = all(name.lstrip("-").isdigit() for name in names)

    def to_id(value: Any) -> int | None:
        if isinstance(value, str):
            return index.get(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if str(value) in index:
                return index[str(value)]
            if not numeric_names and 0 <= value < len(names):
                return value
        return None

    return to_id


class TextClassificationDataModule(ClassificationDataModule):
    """A user's own text classification data, from local files or a hub dataset.

    Files are read by extension: ``.csv``, ``.tsv``, ``.json`` / ``.jsonl`` (JSON lines or a
    JSON list of records), ``.parquet``. Labels are class names or integer class ids; the class
    list is read from the train labels unless ``label_names`` is given, and is stored in
    checkpoints. One text column is classified alone, two as a text pair.

    Without a validation file (or hub ``validation`` split), a stratified, seeded
    ``val_size`` of the train data is held out. ``test_dataloader`` uses the test data, or the
    validation data when there is none. ``predict_dataloader`` uses ``predict_file``, else the
    test data, else the validation data; its batches carry no labels, and ``raw_predict`` holds
    the same rows untokenized.

    Args:
        train_file: Train data file.
        validation_file: Validation data file (default: a split of the train data).
        test_file: Labelled test data file.
        predict_file: File of texts to predict (labels not needed).
        dataset_name: A hub dataset to use instead of train/validation/test files.
        dataset_config_name: Configuration of ``dataset_name``.
        text_columns: One text column, or two for a text pair.
        label_column: Column holding the labels.
        label_names: Class names in class-id order (default: sorted distinct train labels;
            integer labels 0..K-1 keep their ids and are named "0".."K-1").
        val_size: Fraction of the train data held out for validation when there is no
            validation data.
        val_fraction: Deprecated: the old name of ``val_size``.
    """

    _val_size_default: ClassVar[float] = 0.1

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        text_columns: list[str] = ["text"],  # noqa: B006 - never mutated; a list reads best in --help
        label_column: str = "label",
        label_names: list[str] | None = None,
        val_size: float = 0.1,
        val_fraction: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(text_columns, str):
            text_columns = [text_columns]
        if not 1 <= len(text_columns) <= 2:
            raise ValueError(f"text_columns takes one column or two (a text pair), got {list(text_columns)}")
        val_size = renamed("val_fraction", val_fraction, "val_size", val_size, self._val_size_default)
        check_val_size(val_size, fraction_only=True)
        if label_names is not None:
            label_names = [str(name) for name in label_names]
            if len(label_names) < 2 or len(set(label_names)) != len(label_names):
                raise ValueError(f"label_names must be at least 2 distinct names, got {label_names}")
        self._files = {
            "train": train_file,
            "validation": validation_file,
            "test": test_file,
            "predict": predict_file,
        }
        for path in self._files.values():
            if path is not None and Path(path).suffix.lower() not in _FILE_FORMATS:
                raise ValueError(
                    f"unsupported data file type {Path(path).suffix or '(no extension)'!r} for {path}; "
                    f"use one of {', '.join(_FILE_FORMATS)}"
                )
        if dataset_name is not None and any((train_file, validation_file, test_file)):
            raise ValueError(
                f"pass either dataset_name ({dataset_name!r}) or train/validation/test files, not both"
            )
        self.dataset_name = dataset_name
        self.dataset_config_name = dataset_config_name
        self.text_columns = tuple(text_columns)
        self.label_column = label_column
        self.val_size = val_size
        self._label_names: list[str] | None = label_names
        self._raw: dict[str, Dataset | None] = {}
        self._hub: DatasetDict | None = None
        self._fit_splits: tuple[Dataset | None, Dataset] | None = None

    # ---- label space --------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        """Class names in class-id order: as given, restored from a checkpoint, or inferred
        from the train labels (read once, on first use)."""
        if self._label_names is None:
            self._label_names = self._infer_label_names()
        return self._label_names

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def state_dict(self) -> dict[str, Any]:
        # Saved in checkpoints so that predicting with a checkpoint maps ids to the same names.
        return {"label_names": list(self.label_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = state_dict.get("label_names")
        if names is None:
            return
        names = list(names)
        # Lightning restores datamodule state after setup(): data already encoded with other
        # names would silently disagree with the model's head.
        if self._label_names is not None and self._label_names != names:
            raise ValueError(
                f"label_names {self._label_names} differ from the checkpoint's {names}; "
                "pass the checkpoint's label_names or train a new model"
            )
        self._label_names = names

    def _infer_label_names(self) -> list[str]:
        train = self._raw_split("train")
        if train is None:
            raise ValueError(
                "label_names is unknown: pass --data.label_names, or train data "
                "(--data.train_file or --data.dataset_name) to infer it from"
            )
        source = self._describe("train")
        self._check_columns(train, source, [self.label_column])
        feature = train.features[self.label_column]
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
        else:
            names = _label_names_from_values(_distinct_labels(train, self.label_column, source), source,
                                             self.label_column)
        if len(names) < 2:
            raise ValueError(f"{source} has a single label {names!r}; classification needs at least 2 classes")
        rank_zero_info(f"label_names inferred from {source}: {names}")
        return names

    # ---- reading ------------------------------------------------------------------------

    def _describe(self, split: str) -> str:
        path = self._files[split]
        if path is not None:
            return str(path)
        return f"dataset {self.dataset_name!r} split {split!r}"

    def _raw_split(self, split: str) -> Dataset | None:
        """The rows of a split as read (memoised); None when the split has no source."""
        if split not in self._raw:
            ds = self._read_split(split)
            if ds is not None and len(ds) == 0:
                raise ValueError(f"{self._describe(split)} has no rows")
            self._raw[split] = ds
        return self._raw[split]

    def _read_split(self, split: str) -> Dataset | None:
        path = self._files[split]
        if path is not None:
            return self._read_file(path)
        if self.dataset_name is None or split == "predict":
            return None
        if self._hub is None:
            try:
                self._hub = load_dataset(self.dataset_name, self.dataset_config_name, cache_dir=self.cache_dir)
            except Exception as err:  # the hub raises many types; all mean "cannot get it"
                raise ValueError(
                    f"cannot load dataset {self.dataset_name!r}"
                    + (f" ({self.dataset_config_name!r})" if self.dataset_config_name else "")
                    + f": {describe(err)}"
                ) from err
        return self._hub.get(split)

    def _read_file(self, path: str) -> Dataset:
        file = data_file(path)
        builder, options = _FILE_FORMATS[file.suffix.lower()]
        if builder != "parquet":
            check_utf8(file)  # the JSON reader would take other bytes silently
        try:
            ds = load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=self.cache_dir, **options)
            if builder == "csv" and getattr(ds.features.get(self.label_column), "dtype", None) == "bool":
                # pandas reads true/false as booleans; here they are class names: read them as text
                features = Features({**ds.features, self.label_column: Value("string")})
                ds = load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=self.cache_dir,
                                  features=features, **options)
            return ds
        except Exception as err:  # parser errors come wrapped in several types
            if "corresponds to no data" in str(err):  # how datasets reports a file without rows
                raise ValueError(f"{path} has no rows") from err
            raise ValueError(data_file_error(path, err)) from err

    @staticmethod
    def _check_columns(ds: Dataset, source: str, required: list[str]) -> None:
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            raise ValueError(f"{source} has no column(s) {missing}; its columns are {ds.column_names}")

    def _encoded(self, split: str) -> Dataset | None:
        """A split with the class ids in a ``labels`` ClassLabel column; None without a source."""
        ds = self._raw_split(split)
        if ds is None:
            return None
        source = self._describe(split)
        self._check_columns(ds, source, [*self.text_columns, self.label_column])
        names = self.label_names
        to_id = _label_encoder(names)
        feature = ds.features[self.label_column]
        if isinstance(feature, ClassLabel):
            # Hub class ids are ids into the dataset's own names: go through the names.
            dataset_names = feature.names

            def as_value(v: Any) -> Any:
                return dataset_names[v] if isinstance(v, int) and 0 <= v < len(dataset_names) else v

        else:

            def as_value(v: Any) -> Any:
                return v

        unknown = [v for v in _distinct_labels(ds, self.label_column, source) if to_id(as_value(v)) is None]
        if unknown:
            raise ValueError(
                f"label {as_value(unknown[0])!r} in {source} is not one of the label_names {names}"
                + (f" ({len(unknown) - 1} more unknown labels)" if len(unknown) > 1 else "")
            )
        column = self.label_column

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return {"labels": [to_id(as_value(v)) for v in batch[column]]}

        ds = ds.map(encode, batched=True, desc="Encoding labels")
        return ds.cast_column("labels", ClassLabel(names=names))

    # ---- splits -------------------------------------------------------------------------

    def _fit(self) -> tuple[Dataset | None, Dataset]:
        """(train, validation); train is None when only validation data is given."""
        if self._fit_splits is None:
            train, val = self._encoded("train"), self._encoded("validation")
            if val is None:
                if train is None:
                    raise ValueError("no train data: pass --data.train_file or --data.dataset_name")
                try:
                    parts = train.train_test_split(
                        test_size=self.val_size, seed=self.seed, stratify_by_column="labels"
                    )
                except ValueError as err:  # a class with too few rows to stratify
                    rank_zero_warn(f"validation split not stratified ({describe(err)})")
                    parts = train.train_test_split(test_size=self.val_size, seed=self.seed)
                train, val = parts["train"], parts["test"]
            self._fit_splits = (train, val)
        return self._fit_splits

    def _train_split(self) -> Dataset:
        train = self._fit()[0]
        if train is None:
            raise ValueError("no train data: pass --data.train_file or --data.dataset_name")
        return train

    def _val_splits(self) -> list[Dataset]:
        return [self._fit()[1]]

    def _test_splits(self) -> list[Dataset]:
        test = self._encoded("test")
        return [test] if test is not None else self._val_splits()

    def _data_sources(self) -> dict[str, tuple[list[Any], dict[str, Any]]]:
        columns = {"columns": [*self.text_columns, self.label_column]}
        if self.dataset_name is not None:
            columns.update(dataset=self.dataset_name, config=self.dataset_config_name)
        train = (self._source("train"), {**columns, "max_train_samples": self.max_train_samples, "seed": self.seed})
        if self._raw_split("validation") is not None:
            return {"train": train, "val": (self._source("validation"), columns)}
        # recorded under the option's old name: the fingerprints of earlier checkpoints keep matching
        split = {"val_size": self.val_size, "seed": self.seed}
        return {"train": (train[0], {**train[1], **split}),
                "val": (train[0], {**columns, **split, "held_out_of": "train"})}

    def _source(self, split: str) -> list[Any]:
        """What the rows of ``split`` are read from: its file, or the hub dataset's split."""
        if self._files[split] is not None:
            return [self._files[split]]
        ds = self._raw_split(split)
        return [ds] if ds is not None else []

    def _predict_split(self) -> Dataset:
        for split in ("predict", "test"):
            ds = self._raw_split(split)
            if ds is not None:
                self._check_columns(ds, self._describe(split), list(self.text_columns))
                return ds
        return self._val_splits()[0]
