"""Issue 22, rules 5 and 6, with real ``melora-lit`` processes.

* A signal to the whole process group, as SLURM and a shell's Ctrl+C send it, reaches the
  DataLoader workers too: the command still stops as for a signal to its main process (``fit``
  after a resumable save, exit 3; ``validate``/``predict`` with nothing written; SIGINT 130).
  Before, a worker died of the SIGTERM and the run ended in its loader's error (exit 1).
* Bad inputs that were tracebacks, Lightning's own messages or silently taken (devices,
  accelerator, gradient accumulation, a max_length under the special tokens, a tokenizer larger
  than the model's embeddings, relative data paths, a JSON lines file that is not UTF-8, a
  subclass option) are refused in one line, exit 2, leaving the root folder as it was.

The refusals' messages are listed in docs/errors.md ("Settings and inputs"):
``test_docs_table_shows_each_input_case_and_its_actual_message`` compares them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from support import (error_line, errors_doc_rows, melora_popen, run_cli, run_main, sentiment_rows, tree_hashes,
                     with_tests_on_path, write_config, write_csv)
from melora_lit.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED



@pytest.fixture(scope="module")
def base(tmp_path_factory, dropout_bert) -> dict:
    """One finished run (1 epoch of 6 steps) whose checkpoint validate and predict read."""
    work = tmp_path_factory.mktemp("signals-inputs")
    train = write_csv(work / "train.csv", sentiment_rows(64, seed=3))
    root = work / "base"
    cfg = write_config(work / "config.yaml", dropout_bert, train, root, trainer={"max_epochs": 1})
    proc = run_main("fit", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return {"work": work, "cfg": cfg, "root": root, "train": train, "model": dropout_bert, "last": last}


# ----------------------------------------------------------------------------- process-group signals
def _group(pgid: int) -> list[int]:
    """The processes of the process group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _signalled(base: dict, tmp_path: Path, command: str, moment: str, step: int, signame: str,
               *args: str) -> tuple[subprocess.Popen, str]:
    """``command`` with 2 DataLoader workers, in a process group of its own, sent ``signame`` to
    the whole group from here (not from the process itself: PyTorch's workers exit on their
    parent's SIGTERM) while it waits at ``moment`` of ``step`` (tests/signal_at.py)."""
    ready = tmp_path / "ready"
    hook = tmp_path / "hook.yaml"
    hook.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "signal_at.WaitForSignalAt", "init_args": {
        "moment": moment, "step": step, "ready": str(ready)}}]}}))
    proc = melora_popen(command, "--config", str(base["cfg"]), "--config", str(hook), "--trainer.default_root_dir",
                        str(tmp_path / "runs"), "--data.init_args.num_workers", "2", *args, env=with_tests_on_path(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists(), proc.communicate(timeout=60)[1][-3000:]
    assert len(_group(proc.pid)) >= 3  # the command and its two workers get the signal
    os.killpg(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=240)
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    return proc, err


@pytest.mark.slow
@pytest.mark.parametrize("signame, step, status", [("SIGTERM", 2, EXIT_PREEMPTED), ("SIGUSR1", 6, EXIT_PREEMPTED),
                                                   ("SIGINT", 2, EXIT_INTERRUPTED)])
def test_a_signal_to_the_process_group_stops_fit_after_a_resumable_save(base, tmp_path, signame, step, status):
    """SIGTERM (mid-epoch) or SIGUSR1 (at the epoch's last step) to the group: fit saves the step
    and exits 3, and ``--ckpt_path last`` trains on from it; SIGINT to the group exits 130."""
    proc, err = _signalled(base, tmp_path, "fit", "train_batch_end", step, signame, "--trainer.max_epochs", "2")
    assert proc.returncode == status, err[-3000:]
    if status != EXIT_PREEMPTED:
        return
    assert f"received {signame}: stopped after step {step}" in err
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step
    resumed = run_cli("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(tmp_path / "runs"),
                      "--data.init_args.num_workers", "2", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr and "melora-lit: after 12 steps" in resumed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command, signame, status", [("predict", "SIGTERM", EXIT_PREEMPTED),
                                                      ("validate", "SIGUSR1", EXIT_PREEMPTED),
                                                      ("predict", "SIGINT", EXIT_INTERRUPTED)])
def test_a_signal_to_the_process_group_stops_predict_and_validate_with_nothing_written(base, tmp_path, command,
                                                                                        signame, status):
    """After the second batch: exit 3 (130 for SIGINT), no prediction file, no run folder left,
    the run it read byte-identical."""
    preds = tmp_path / "out" / "preds.csv"
    before = tree_hashes(base["root"])
    extra = ["--data.init_args.predict_file", str(base["train"]), "--prediction_writer.output_file", str(preds)]
    proc, err = _signalled(base, tmp_path, command, "predict" if command == "predict" else "validation", 1, signame,
                           "--ckpt_path", str(base["last"]), "--data.init_args.batch_size", "4",
                           *(extra if command == "predict" else []))
    assert proc.returncode == status, err[-3000:]
    if status == EXIT_PREEMPTED:
        assert f"received {signame}: {command} stopped after batch 2, nothing written" in err
    assert not preds.parent.exists() or not any(preds.parent.iterdir())
    logs = tmp_path / "runs" / "lightning_logs"
    assert not logs.exists() or not any(logs.iterdir())
    assert tree_hashes(base["root"]) == before


class _Dispositions(torch.utils.data.Dataset):
    """One item: how the worker that loads it handles the stop signals, and what its user's
    ``worker_init_fn`` left."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        return {"ignored": [signal.getsignal(s) == signal.SIG_IGN for s in stops],
                "user": os.environ.get("USER_WORKER_INIT", "")}


def _user_init(worker_id: int) -> None:
    os.environ["USER_WORKER_INIT"] = f"ran in worker {worker_id}"


@pytest.mark.parametrize("kind", ["DataLoader", "ResumableDataLoader"])
def test_workers_ignore_the_stop_signals_and_a_users_worker_init_fn_still_runs(kind):
    """The loaders' ``worker_init_fn`` (melora_lit.run.worker_init) makes a worker ignore
    SIGTERM, SIGUSR1 and SIGINT, then runs the user's own; a ResumableDataLoader wraps the one
    it is given."""
    from torch.utils.data import DataLoader

    from melora_lit.run import worker_init
    from melora_lit.loading import ResumableDataLoader, ResumableRandomSampler

    data = _Dispositions()
    if kind == "DataLoader":
        loader = DataLoader(data, num_workers=1, collate_fn=lambda items: items[0],
                            worker_init_fn=worker_init(_user_init))
    else:
        loader = ResumableDataLoader(data, sampler=ResumableRandomSampler(data, 0, 1, 0), num_workers=1,
                                     collate_fn=lambda items: items[0], worker_init_fn=_user_init)
    item = next(iter(loader))
    assert item == {"ignored": [True] * 3, "user": "ran in worker 0"}


@pytest.mark.slow  # a fresh interpreter
def test_workers_left_running_do_not_hold_up_the_exit(tmp_path):
    """A loader's workers that are still up when the process exits (its iterator not shut down,
    e.g. kept by an exception's traceback) ignore multiprocessing's SIGTERM at exit: they are
    killed instead of waited for forever, and the exit is clean."""
    code = ("import torch\n"
            "from torch.utils.data import DataLoader\n"
            "from melora_lit.run import worker_init\n"
            "loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=worker_init())\n"
            "kept = iter(loader)\n"
            "next(kept)\n"
            "print('batch', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "batch\n", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- one-line refusals
def _write_inputs(base: dict) -> Path:
    """The files of the input cases, in ``$WORK/inputs``: a model folder whose embeddings are
    fewer than its tokenizer's tokens, a config in a sub-folder that names its data relative to
    that folder, a JSON lines file with a Latin-1 line, a GLUE config."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    work = base["work"] / "inputs"
    small = work / "small-vocab-bert"
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(small)
    AutoTokenizer.from_pretrained(base["model"]).save_pretrained(small)
    rows = sentiment_rows(40, seed=5)
    (work / "configs" / "data").mkdir(parents=True)
    write_csv(work / "configs" / "data" / "train.csv", rows)
    config = yaml.safe_load(base["cfg"].read_text())
    config["data"]["init_args"]["train_file"] = "data/train.csv"  # beside the config, not in the current folder
    (work / "configs" / "relative.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[6] = lines[6].replace('"review": "', '"review": "caf\u00e9 ', 1)
    (work / "latin1.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    config["data"] = {"class_path": "melora_lit.data.GLUEDataModule",
                      "init_args": {"task": "rte", "data_dir": str(work / "glue"), "batch_size": 8, "max_length": 32}}
    (work / "glue.yaml").write_text(yaml.safe_dump(config))
    return work


# case -> (arguments after ``fit`` and the base config, words the message must hold); "$WORK" is
# the inputs folder, the processes' current folder
INPUTS: dict[str, tuple[list[str], str]] = {
    "devices_not_a_number": (["--trainer.devices", "abc"], "trainer.devices='abc' is not valid"),
    "devices_list_not_numbers": (["--trainer.devices", "0,x"], "trainer.devices='0,x' is not valid"),
    "accelerator_unknown": (["--trainer.accelerator", "gpux"], "trainer.accelerator='gpux' is not valid; use one of"),
    "device_index_on_the_cpu": (["--trainer.devices", "[3]"], "trainer.devices=[3] names device indices (3)"),
    "accumulate_zero": (["--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches=0 is not valid"),
    "accumulate_negative": (["--trainer.accumulate_grad_batches", "-2"], "accumulate_grad_batches=-2 is not valid"),
    "accumulate_fraction": (["--trainer.accumulate_grad_batches", "1.5"], "'1.5' is not valid; use an integer"),
    "max_length_under_special_tokens": (["--data.init_args.max_length", "1"],
                                        "data.init_args.max_length=1 leaves no room for text"),
    "tokenizer_larger_than_embeddings": (["--model.model_name_or_path", "$WORK/small-vocab-bert"],
                                         "has 30522 tokens, more than the 99 token embeddings"),
    "relative_data_path_missing": (["--config", "$WORK/configs/relative.yaml"],
                                   "resolved against the current folder $WORK, not against the config file's folder"),
    "jsonl_not_utf8": (["--data.init_args.train_file", "$WORK/latin1.jsonl"],
                       "$WORK/latin1.jsonl: line 7, column 16 is not utf-8 text"),
    "subclass_option_named_as_typed": (["--config", "$WORK/glue.yaml", "--data.init_args.task", "rtx"],
                                       "data.init_args.task='rtx' is not valid; use one of cola,"),
}


def _paths(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def inputs(base) -> dict:
    """Each input case run as a real ``fit`` (in ``$WORK``) on a copy of the base run's root: its
    output, and the root's files and hashes before and after."""
    work = _write_inputs(base)
    root = work / "root"
    shutil.copytree(base["root"], root)
    out = {}
    for case, (args, _) in INPUTS.items():
        args = [a.replace("$WORK", str(work)) for a in args]
        config = [] if args[0] == "--config" else ["--config", str(base["cfg"])]
        before = (_paths(root), tree_hashes(root), _paths(work))
        proc = run_cli("fit", *config, *args, "--trainer.default_root_dir", str(root), cwd=work, timeout=600)
        out[case] = {"proc": proc, "before": before, "after": (_paths(root), tree_hashes(root), _paths(work))}
    return {"work": work, "results": out}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INPUTS))
def test_a_bad_input_gives_one_line_exit_2_and_creates_nothing(inputs, case):
    result = inputs["results"][case]
    message = error_line(result["proc"]).replace(str(inputs["work"]), "$WORK")
    print(f"{case}: exit {result['proc'].returncode}: {message}")
    assert result["proc"].returncode == 2 and INPUTS[case][1] in message, message
    assert result["after"] == result["before"]  # no run folder, no config.yaml, no event file; nothing new


@pytest.mark.slow  # the cases are real processes
def test_docs_table_shows_each_input_case_and_its_actual_message(inputs):
    """docs/errors.md ("Settings and inputs") shows each case's actual message."""
    rows = errors_doc_rows("test_signals_and_inputs.py")
    assert set(rows) == set(INPUTS)
    for case, result in inputs["results"].items():
        message = error_line(result["proc"]).replace(str(inputs["work"]), "$WORK")
        assert rows[case] == message.replace("|", "\\|"), case
