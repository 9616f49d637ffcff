"""Fixtures shared by the test files; the plain builders are in tests/support.py."""

from __future__ import annotations

import pytest

from support import save_tiny_bert


@pytest.fixture(scope="session")
def dropout_bert(tmp_path_factory) -> str:
    """2-layer BERT, hidden 32, with its default dropout (0.1) on, and the real MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("dropout-bert"), hidden=32, layers=2, heads=2, max_positions=64)
