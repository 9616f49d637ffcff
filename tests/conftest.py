"""Fixtures shared by the test files; the plain builders are in tests/support.py.

The fixtures are folders of saved models (paths), named ``saved_*`` or ``*_bert``; the
builders ``support.tiny_bert`` etc. return in-memory models.
"""

from __future__ import annotations

import pytest

from support import save_tiny_bert


@pytest.fixture(scope="session")
def dropout_bert(tmp_path_factory) -> str:
    """2-layer BERT, hidden 32, with its default dropout (0.1) on, and the real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), hidden=32, layers=2, heads=2, max_positions=64)


@pytest.fixture(scope="session")
def saved_bert(tmp_path_factory) -> str:
    """4-layer BERT, hidden 64, with its default dropout (0.1), and the real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("saved-bert"))


@pytest.fixture(scope="session")
def saved_bert_no_dropout(tmp_path_factory) -> str:
    """4-layer BERT, hidden 64, no dropout anywhere (exact comparisons across processes), and the
    real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("saved-bert-no-dropout"), dropout=False)
