"""Fixtures shared by the test files; the plain builders are in tests/support.py.

The fixtures are folders of saved models (paths), named ``saved_*`` or ``*_bert``; the
builders ``support.tiny_bert`` etc. return in-memory models.
"""

from __future__ import annotations

import os

import pytest
import torch

from support import save_tiny_bert

# Under pytest-xdist each worker gets its share of the cores for torch's thread pool, and so do
# the melora-lit processes it starts (OMP_NUM_THREADS): two workers of 2 threads each on 2 cores
# spend their time waiting for each other. Results do not depend on it (tests that compare runs
# compare runs made under the same setting).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


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


# The modules with the longest runs first: pytest-xdist (--dist loadscope) hands modules to the
# workers in collection order, so the long ones start at once and the short ones fill in at the
# end, instead of one worker finishing a long module alone (longest-first scheduling).
LONGEST_FIRST = ["test_distributed", "test_cluster", "test_gpu_check", "test_resilience", "test_outputs",
                 "test_quantization", "test_run_folders", "test_signals_and_inputs", "test_slurm", "test_generate",
                 "test_token_weighted_loss", "test_warm_start", "test_chat", "test_training", "test_errors",
                 "test_conventions", "test_tracking", "test_gguf", "test_instruct"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank)))
