"""Run folders and resume, with real ``melora-lit`` processes: a refused resume writes nothing,
``--ckpt_path last`` takes the newest run (whatever the logger) or says why it cannot, two runs
started together get two folders, a second SIGTERM does not change the exit status, and a run
cleans up what it left when it was killed or failed. Every fault case checks the hashes of every
earlier run's files before and after.

The messages of the fault cases are listed in docs/errors.md ("Runs, resume and checkpoints"):
``test_docs_table_shows_each_case_and_its_actual_message`` compares them.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import (error_line, errors_doc_rows, melora_cmd, melora_env, melora_popen, run_cli, run_main,
                     sentiment_rows, tree_hashes, with_tests_on_path, write_config, write_csv)
from melora_lit.errors import EXIT_PREEMPTED



def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, dropout_bert) -> dict:
    """One finished run (1 epoch, 6 steps, a checkpoint every 2 steps) to copy for each case."""
    work = tmp_path_factory.mktemp("run-folders")
    train = write_csv(work / "train.csv", sentiment_rows(64, seed=3))
    root = work / "base"
    cfg = write_config(work / "config.yaml", dropout_bert, train, root, trainer={"max_epochs": 1})
    proc = run_main("fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"work": work, "cfg": cfg, "root": root, "train": train, "model": dropout_bert}


def _copy(base: dict, name: str) -> Path:
    root = base["work"] / name
    shutil.copytree(base["root"], root, symlinks=True)
    return root


def _fit(base: dict, root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 900)  # a loaded machine: the default 300 s is too short for some runs
    return run_main("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
                   "--checkpoint.every_n_train_steps", "2", *args, **kw)


def _unreadable_last(root: Path) -> None:
    newest = root / "lightning_logs" / "version_1" / "checkpoints"
    newest.mkdir(parents=True)
    (newest / "last.ckpt").symlink_to("/dev/zero")


# case -> (how its root is prepared, arguments, words the message must hold)
FAULTS: dict[str, tuple] = {
    "resume_other_settings": ("copy", ["--ckpt_path", "last", "--model.melora.n", "4"],
                              "it was trained with melora.n=2, this run sets melora.n=4"),
    "resume_other_seed": ("copy", ["--ckpt_path", "last", "--data.init_args.seed", "7"],
                          "data seed 42, this run's is 7"),
    "unreadable_last": (_unreadable_last, ["--ckpt_path", "last"], "lightning_logs/version_1/checkpoints/last.ckpt"),
    "no_run_to_resume": ("empty", ["--ckpt_path", "last"], "--ckpt_path auto"),
    "failed_run": ("copy", ["--model.melora.n", "5"], "n=5 does not divide"),  # fails after config.yaml
}


@pytest.fixture(scope="module")
def faults(base) -> dict:
    """Each fault case run by ``melora-lit``'s ``main`` in this process, each in its own copy of
    the base run; the trees before and after."""
    prepared = {}
    for case, (prepare, args, _) in FAULTS.items():
        root = base["work"] / case
        if prepare == "empty":
            root.mkdir()
        else:
            _copy(base, case)
            if callable(prepare):
                prepare(root)
        prepared[case] = (root, tree_hashes(root))

    procs = {case: _fit(base, prepared[case][0], *FAULTS[case][1]) for case in FAULTS}
    return {case: {"proc": procs[case], "root": root, "before": before, "after": tree_hashes(root)}
            for case, (root, before) in prepared.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_gives_one_line_exit_2_and_leaves_every_earlier_run_as_it_was(faults, base, case):
    """A refused resume (other settings, other data seed), an unreadable newest ``last.ckpt``
    (never an older run instead), ``last`` with no run at all, a run failing after it made its
    folder (the folder goes again): one line, exit 2, every earlier file byte-identical."""
    result = faults[case]
    message = error_line(result["proc"])
    print(f"{case}: exit {result['proc'].returncode}: {message}")
    assert result["proc"].returncode == 2 and FAULTS[case][2] in message
    assert result["after"] == result["before"]  # config.yaml, events, checkpoints; nothing new
    if case == "unreadable_last":
        assert str(result["root"] / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt") in message


@pytest.mark.slow  # the fingerprint cases are real processes
def test_docs_table_shows_each_case_and_its_actual_message(faults, changes, base):
    """docs/errors.md ("Runs, resume and checkpoints") shows each fault case's actual message (a
    sha256 digest as any 12 hex digits: a backbone's comes from its random weights)."""
    rows = errors_doc_rows("test_run_folders.py")
    assert set(rows) == set(FAULTS) | set(CHANGES)
    for case, result in [*faults.items(), *changes.items()]:
        message = error_line(result["proc"]).replace(str(result["root"]), "$ROOT").replace(str(base["work"]), "$WORK")
        digests = re.compile(r"\b[0-9a-f]{12}\b")
        assert digests.sub("<sha256>", rows[case]) == digests.sub("<sha256>", message.replace("|", "\\|")), case


# ----------------------------------------------------------------------------- resume, any logger
@pytest.mark.slow
@pytest.mark.parametrize("logger", ["CSVLogger", "false"])
def test_last_resumes_the_newest_run_whatever_the_logger_and_cleans_what_a_kill_left(base, logger):
    """The newest run is resumed in its own folder with a CSV logger or none; on that start it
    removes a temp file of a write that was killed and an ``epoch=...`` file beyond save_top_k."""
    root = base["work"] / f"resume-{logger}"  # a run of its own: a moved run folder resumes as a new top-k
    assert _fit(base, root).returncode == 0
    ckpts = root / "lightning_logs" / "version_0" / "checkpoints"
    stale = ckpts / f".melora-tmp-{socket.gethostname()}-{_dead_pid()}-0badc0de"
    stale.write_bytes(b"half a checkpoint")
    extra = ckpts / "epoch=0-step=2.ckpt"  # save_top_k=1 kept only step 6; a kill left this one
    shutil.copy(ckpts / "last.ckpt", extra)
    args = (["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(root)] if logger == "CSVLogger"
            else ["--trainer.logger", "false"])
    proc = _fit(base, root, "--ckpt_path", "last", "--trainer.max_epochs", "2", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {ckpts / 'last.ckpt'}" in proc.stderr
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]  # no new run
    assert _load(ckpts / "last.ckpt")["global_step"] == 12
    assert not stale.exists() and not extra.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=1-step=12.ckpt", "last.ckpt"]
    if logger == "CSVLogger":  # melora-lit report reads CSV logs too
        final = re.search(r"melora-lit: after 12 steps: val/accuracy ([\d.]+)", proc.stderr).group(1)
        run = root / "lightning_logs" / "version_0"
        shutil.rmtree(run / "checkpoints")  # (a copy without the TensorBoard events of epoch 0)
        for events in run.glob("events.out.tfevents.*"):
            events.unlink()
        report = run_main("report", str(run), "--output", str(root / "report"), timeout=900)
        assert report.returncode == 0, report.stderr[-2000:]
        import csv

        rows = list(csv.DictReader(open(root / "report" / "report.csv")))
        assert len(rows) == 1 and rows[0]["metric"] == "val/accuracy"
        assert f"{float(rows[0]['best']):.4g}" == final


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- version folders
def _allocate_many(root: str, count: int, queue) -> None:
    from melora_lit.run import allocate_version

    queue.put([allocate_version(root) for _ in range(count)])


@pytest.mark.slow
def test_version_folders_are_allocated_atomically_across_processes(tmp_path):
    # forked: six processes racing for the same folders, without six interpreters importing torch
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(tmp_path), 10, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [v for _ in procs for v in queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(got) == list(range(60))  # 60 folders, none shared
    assert sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir()) == list(range(60))


@pytest.mark.slow
def test_two_runs_started_together_get_two_folders(base, tmp_path):
    root = tmp_path / "together"
    args = ["fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    procs = [melora_popen(*args, "--model.learning_rate", lr, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) for lr in ("1e-2", "3e-2")]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    runs = sorted((root / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    rates = set()
    for run in runs:
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        rates.add(_load(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["learning_rate"])
        assert f"learning_rate: {_load(run / 'checkpoints' / 'last.ckpt')['hyper_parameters']['learning_rate']}" \
            in (run / "config.yaml").read_text()
    assert rates == {1e-2, 3e-2}


# ----------------------------------------------------------------------------- SIGTERM twice
@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.05, 1.0])
def test_a_second_sigterm_changes_nothing(base, tmp_path, gap):
    root = tmp_path / "sigterm"
    proc = melora_popen("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
                        "--checkpoint.every_n_train_steps", "1", "--trainer.max_epochs", "3",
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = root / "lightning_logs" / "version_0" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(ckpts.glob("epoch=*-step=*.ckpt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    print(f"gap {gap} s: exit {proc.returncode}")
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "received SIGTERM: stopped after step" in err and "Traceback" not in err
    last = _load(ckpts / "last.ckpt")
    assert 1 <= last["global_step"] < 18
    assert not list(ckpts.glob(".melora-tmp-*"))


def test_a_run_killed_in_its_first_checkpoint_write_is_found_and_its_temp_file_removed(tmp_path):
    """No last.ckpt, only the temp file of a dead writer: ``last`` has nothing to resume, the temp
    file goes, and ``auto`` is told to start that run again in its own folder. A live writer's
    temp file (this process) and an older run's files are left alone."""
    from melora_lit.run import find_last

    logs = tmp_path / "lightning_logs"
    older = logs / "version_0" / "checkpoints"
    older.mkdir(parents=True)
    (older / "last.ckpt").write_bytes(b"older run")
    dead = logs / "version_1" / "checkpoints"
    dead.mkdir(parents=True)
    (dead / f".melora-tmp-{socket.gethostname()}-{_dead_pid()}-0badc0de").write_bytes(b"half")
    assert find_last(None, logs, tmp_path / "checkpoints") == (None, logs / "version_1")
    assert not dead.exists() and (older / "last.ckpt").read_bytes() == b"older run"
    live = logs / "version_2" / "checkpoints"
    live.mkdir(parents=True)
    (live / f".melora-tmp-{socket.gethostname()}-{os.getppid()}-0badc0de").write_bytes(b"being written")
    assert find_last(None, logs, None) == (older / "last.ckpt", None)  # version_2 is not dead: skipped
    assert len(list(live.iterdir())) == 1


@pytest.mark.slow
def test_a_sharded_checkpoint_folder_resumes_through_the_cli(base, tmp_path):
    """FSDP2 with ``save_distributed_checkpoint: true`` writes Lightning's sharded folder (one file
    per rank): ``--ckpt_path last`` finds it, checks it (its ``meta.pt``) and the 2-process run
    continues it in its folder."""
    root = tmp_path / "sharded"
    args = ["fit", "--config", str(base["cfg"]), "--config", str(Path(__file__).parents[1] / "configs/strategy/fsdp2.yaml"),
            "--trainer.devices", "2", "--trainer.strategy.init_args.save_distributed_checkpoint", "true",
            "--trainer.default_root_dir", str(root)]
    first = run_cli(*args, "--trainer.max_epochs", "1", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2
    assert _load(last / "meta.pt")["global_step"] == 3  # 48 rows, 2 processes of batch 8
    again = run_cli(*args, "--trainer.max_epochs", "2", "--ckpt_path", "last", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(f"resuming from {last}") == 1
    assert "melora-lit: after 6 steps" in again.stderr
    assert _load(last / "meta.pt")["global_step"] == 6
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]


# ------------------------------------------------------------- what a checkpoint may decide (issue 22, rule 3)
def _forged(base: dict, name: str, **hparams) -> Path:
    """The base run's last checkpoint with ``hparams`` written into its saved settings."""
    ckpt = _load(base["root"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"].update(hparams)
    path = base["work"] / f"{name}.ckpt"
    torch.save(ckpt, path)
    return path


def _remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config names its own Python (``auto_map``); importing it writes ``marker``."""
    from transformers import BertConfig

    folder.mkdir()
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}).save_pretrained(folder)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n")
    return folder


@pytest.mark.parametrize("command", ["validate", "export"])
def test_a_checkpoint_cannot_enable_remote_code_or_import_a_package(base, tmp_path, command):
    """Settings read from a checkpoint never run code: ``trust_remote_code: true`` with a model
    folder that has an ``auto_map``, and a ``package:MODULE`` source, are refused in one line
    unless the user's own command line or config asks for them; nothing is written or run."""
    marker = tmp_path / "code-ran"
    evil = _remote_code_model(tmp_path / "evil-model", marker)
    remote = _forged(base, f"remote-{command}", trust_remote_code=True, model_name_or_path=str(evil))
    package = _forged(base, f"package-{command}", model_name_or_path="package:this_module_must_not_be_imported")
    before = tree_hashes(base["work"])
    for ckpt, words in ((remote, "sets trust_remote_code: true"), (package, "imports the Python package")):
        if command == "export":
            proc = run_main("export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out"))
        else:
            proc = run_main("validate", "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "runs"))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert words in error_line(proc) and str(ckpt) in error_line(proc)
    assert not marker.exists() and "this_module_must_not_be_imported" not in sys.modules
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    assert tree_hashes(base["work"]) == before


@pytest.mark.parametrize("ckpt_path", ["file", "last"])
def test_settings_typed_for_a_resume_are_never_replaced_by_the_checkpoints(base, ckpt_path):
    """``--ckpt_path FILE`` with settings on the command line: LightningCLI replaces them with the
    checkpoint's, and a resume restores the optimizer's learning rate over the typed one. Each is
    refused in one line, writing nothing, as with ``--ckpt_path last``: a setting the adapter
    does not fit (``melora.n``) and one the restored optimizer would drop (the learning rate).
    A setting that does apply on resume (the number of epochs) trains on."""
    root = _copy(base, f"typed-{ckpt_path}")
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last) if ckpt_path == "file" else "last", "--trainer.max_epochs", "2"]
    before = tree_hashes(root)
    for typed, words in ((["--model.melora.n", "4"], "it was trained with melora.n=2, this run sets melora.n=4"),
                         (["--model.learning_rate", "0.05"],
                          "was trained with learning_rate=0.01, this run sets learning_rate=0.05")):
        refused = _fit(base, root, *resume, *typed)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert words in error_line(refused)
        assert tree_hashes(root) == before
    applied = _fit(base, root, *resume)
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert "melora-lit: after 12 steps" in applied.stderr


# ------------------------------------------------------------- outputs (issue 22, rule 4)
@pytest.mark.slow
def test_outputs_are_never_replaced_without_overwrite_and_follow_their_extension(base, tmp_path):
    """``predict``'s file and ``report``'s folder, like ``export``'s: an existing output is refused
    in one line before any work, byte-identical afterwards, and replaced with the command's
    ``--overwrite``; a prediction file's format follows its extension or is refused."""
    last = base["root"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    preds = tmp_path / "preds.csv"
    preds.write_text("an earlier result\n")
    predict = ["predict", "--config", str(base["cfg"]), "--ckpt_path", str(last), "--data.init_args.predict_file",
               str(base["train"]), "--trainer.default_root_dir", str(tmp_path / "runs")]
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "report.md").write_text("an earlier report\n")
    before = tree_hashes(tmp_path)
    refused = {
        "exists": run_main(*predict, "--prediction_writer.output_file", str(preds)),
        "extension": run_main(*predict, "--prediction_writer.output_file", str(tmp_path / "preds.txt")),
        "report": run_main("report", str(base["root"]), "--output", str(report_dir)),
    }
    words = {"exists": f"{preds} exists; pass --overwrite to replace it",
             "extension": "has the extension '.txt'; the format follows the extension: use one of .csv, .jsonl",
             "report": "already holds report.md; pass --overwrite to replace the report"}
    for case, proc in refused.items():
        assert proc.returncode == 2, (case, proc.stderr[-3000:])
        assert words[case] in error_line(proc), case
    assert tree_hashes(tmp_path) == before  # no run folder, no prediction, no report
    replaced = run_main(*predict, "--prediction_writer.output_file", str(preds), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert preds.read_text().startswith("review,sentiment,prediction") and len(preds.read_text().splitlines()) == 65
    again = run_main("report", str(base["root"]), "--output", str(report_dir), "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.csv", "report.md", "report.png"]
    assert (report_dir / "report.md").read_text() != "an earlier report\n"


# ------------------------------------------------------------- signals outside fit (issue 22, rule 5)
@pytest.mark.slow
@pytest.mark.parametrize("signame, status", [("SIGTERM", 3), ("SIGINT", 130)])  # SIGUSR1: the report test
def test_predict_stops_on_a_signal_and_writes_nothing(base, tmp_path, signame, status):
    """A scheduler's SIGTERM/SIGUSR1 or a Ctrl+C during ``predict`` (here after its second batch)
    stops the real process after that batch: status 3 (130 for SIGINT), no prediction file, no
    temporary file, no new run folder; the run it read is byte-identical."""
    import yaml

    last = base["root"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    hook = tmp_path / "signal.yaml"
    hook.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "signal_at.SignalAt", "init_args": {
        "signame": signame, "moment": "predict", "step": 1}}]}}))
    preds = tmp_path / "out" / "preds.csv"
    before = tree_hashes(base["root"])
    proc = run_cli("predict", "--config", str(base["cfg"]), "--config", str(hook), "--ckpt_path", str(last),
                   "--data.init_args.predict_file", str(base["train"]), "--data.init_args.batch_size", "4",
                   "--prediction_writer.output_file", str(preds), "--trainer.default_root_dir", str(tmp_path / "runs"),
                   env=with_tests_on_path())
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if signame != "SIGINT":
        assert f"received {signame}: predict stopped after batch 2, nothing written" in proc.stderr
    assert not preds.exists() and not (preds.parent.exists() and any(preds.parent.iterdir()))
    assert not (tmp_path / "runs" / "lightning_logs").exists() or not any((tmp_path / "runs" / "lightning_logs").iterdir())
    assert tree_hashes(base["root"]) == before


# ------------------------------------------------------------- validate, then write (issue 22, rule 2)
def test_a_resume_refused_for_its_data_writes_nothing(base):
    """A resume whose epochs would have another number of batches (here a larger batch size) is
    refused in one line before the run's config.yaml is rewritten or an event file is added to
    the resumed folder (before: refused at the first step, after both were written)."""
    root = _copy(base, "other-batch-size")
    before = tree_hashes(root)
    proc = _fit(base, root, "--ckpt_path", "last", "--trainer.max_epochs", "2", "--data.init_args.batch_size", "16")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "epoch of 6 batches per process" in error_line(proc) and "this run's epochs have 3" in error_line(proc)
    assert tree_hashes(root) == before


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_auto_without_a_run_is_refused_outside_fit(base, tmp_path, command):
    """``--ckpt_path auto`` starts a new run for ``fit``; ``validate``/``test``/``predict`` with no
    run to take it from are refused in one line instead of using an untrained model, and create
    nothing."""
    root = tmp_path / "empty"
    root.mkdir()
    proc = run_main(command, "--config", str(base["cfg"]), "--ckpt_path", "auto", "--trainer.default_root_dir", str(root),
                    "--data.init_args.validation_file", str(base["train"]), "--data.init_args.predict_file",
                    str(base["train"]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{command} needs a trained model, not a new one: give --ckpt_path FILE" in error_line(proc)
    assert list(root.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("signame, status", [("SIGUSR1", 3), ("SIGINT", 130)])  # SIGTERM: the predict test
def test_report_stops_on_a_signal_and_leaves_no_partial_report(base, tmp_path, signame, status):
    """A command without a trainer (here ``report``) stops on a signal sent while it writes (the
    moment chosen exactly: as its plot starts): status 3 (130 for SIGINT), one line, and neither a
    report file nor a temporary file in the output folder."""
    out = tmp_path / "report"
    code = (f"import os, signal, melora_lit.report as report\n"
            f"plot = report._plot\n"
            f"def signalled(*args):\n"
            f"    os.kill(os.getpid(), signal.{signame})\n"
            f"    return plot(*args)\n"
            f"report._plot = signalled\n"
            f"from melora_lit.cli import main\n"
            f"main(['report', {str(base['root'])!r}, '--output', {str(out)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=melora_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"received {signame}: report stopped" if status == 3 else "interrupted (SIGINT)") in proc.stderr
    assert list(out.iterdir()) == []


def test_a_misspelled_early_stopping_monitor_is_refused_before_the_first_step(base, tmp_path):
    """An EarlyStopping monitor the run never logs is refused like the checkpoint's, before any
    step (before: after the first epoch had trained, and the run folder was then removed with it)."""
    root = tmp_path / "runs"
    proc = _fit(base, root, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/acuracy")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "EarlyStopping.monitor='val/acuracy' is never logged by this run" in error_line(proc)
    assert "val/accuracy" in error_line(proc) and "melora-lit: after" not in proc.stderr
    assert not (root / "lightning_logs").exists() or list((root / "lightning_logs").iterdir()) == []


# ----------------------------------------------------------------------------- start-up signals
@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit", "predict"])
def test_a_signal_during_start_up_stops_before_the_first_step_and_writes_nothing(base, tmp_path, command):
    """SIGTERM while a fresh ``melora-lit`` is still importing torch and Lightning (as a scheduler
    or ``docker stop`` may send it; a process that is PID 1 would ignore it without a handler):
    taken by the entry point before the imports, honoured at the first safe point, before any
    step or batch: exit 3, one line, no run folder and no output. (A fresh interpreter: the
    start-up is the point.)"""
    root = tmp_path / "runs"
    preds = tmp_path / "preds.csv"
    last = base["root"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = tree_hashes(base["root"])
    extra = (["--ckpt_path", str(last), "--data.init_args.predict_file", str(base["train"]),
              "--prediction_writer.output_file", str(preds)] if command == "predict" else [])
    proc = subprocess.Popen(melora_cmd(command, "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
                                       *extra), env=melora_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)  # the imports take seconds: the signal comes during them
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert f"received SIGTERM while starting: {command} stopped before its first step" in err, err[-3000:]
    assert "Traceback" not in err
    assert not list(root.rglob("*.ckpt")) and not list(root.rglob("events.out.tfevents.*"))
    assert not (root / "lightning_logs").exists() or not any((root / "lightning_logs").iterdir())
    assert not preds.exists() and tree_hashes(base["root"]) == before


@pytest.mark.parametrize("ckpt", ["last", "auto", "file"])
def test_a_finished_run_resumed_says_so_and_writes_nothing(base, ckpt):
    """The base run trained its 1 epoch: resuming it (a requeued job after the run ended, or a
    user's ``--ckpt_path``) trains nothing. It says so in one line, exits 0 and leaves every file
    of the run byte-identical (no rewritten config.yaml, no new event file)."""
    root = _copy(base, f"finished-{ckpt}")
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = tree_hashes(root)
    proc = _fit(base, root, "--ckpt_path", str(last) if ckpt == "file" else ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "is a finished run" in line]
    assert len(lines) == 1 and "it trained 1 epoch and --trainer.max_epochs is 1" in lines[0], proc.stderr[-3000:]
    assert "nothing written" in lines[0] and "Traceback" not in proc.stderr
    assert tree_hashes(root) == before
    # with a higher limit the same checkpoint trains on
    proc = _fit(base, root, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert proc.returncode == 0 and "is a finished run" not in proc.stderr, proc.stderr[-3000:]
    newest = max(last.parent.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)  # last-v1: a copied run folder
    assert torch.load(newest, weights_only=True)["global_step"] == 12


# ------------------------------------------------------------- data and backbone belong to the run (issue 22, rule 3)
def _flipped_labels(base: dict) -> Path:
    """The base run's training file with every label flipped: as many rows and bytes, other contents."""
    data = base["train"].read_bytes().replace(b"positive", b"\0").replace(b"negative", b"positive")
    (base["work"] / "flipped_train.csv").write_bytes(data.replace(b"\0", b"negative"))
    return base["work"] / "flipped_train.csv"


def _other_weights(base: dict) -> Path:
    """The base run's backbone folder (config, tokenizer) with other weights of the same shapes."""
    from transformers import BertModel

    folder = base["work"] / "other-weights"
    shutil.copytree(base["model"], folder)
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.0)
    model.save_pretrained(folder)
    return folder


def _validated_run(base: dict) -> Path:
    """A run of its own, trained 2 steps with a validation file, which is then rewritten in place."""
    root, val = base["work"] / "validated", base["work"] / "val.csv"
    write_csv(val, sentiment_rows(16, seed=5))
    proc = _fit(base, root, "--data.init_args.validation_file", str(val), "--trainer.limit_train_batches", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    write_csv(val, sentiment_rows(16, seed=6))
    return root


# case -> (--accept_change value, how its root and arguments are made, words the message must hold)
CHANGES: dict[str, tuple] = {
    "resume_other_train_data": ("train_data", lambda b: (_copy(b, "other-train"), [
        "--data.init_args.train_file", str(_flipped_labels(b))]), "train file $WORK/flipped_train.csv changed"),
    "resume_other_val_data": ("val_data", lambda b: (_validated_run(b), [
        "--data.init_args.validation_file", str(b["work"] / "val.csv"), "--trainer.limit_train_batches", "2"]),
        "was validated on other data: validation file $WORK/val.csv changed"),
    "resume_other_backbone_weights": ("backbone", lambda b: (_copy(b, "other-backbone"), [
        "--model.model_name_or_path", str(_other_weights(b))]),
        "another backbone: weights file model.safetensors of $WORK/other-weights changed"),
}


@pytest.fixture(scope="module")
def changes(base) -> dict:
    """Each case resumed (to a second epoch) by a real process on changed data or another
    backbone; its run folder before and after."""
    out = {}
    for case, (_, prepare, _) in CHANGES.items():
        root, args = prepare(base)
        before = tree_hashes(root)
        proc = run_cli("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
                       "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last", "--trainer.max_epochs", "2",
                       *args, timeout=900)
        out[case] = {"proc": proc, "root": root, "args": args, "before": before, "after": tree_hashes(root)}
    return out


@pytest.mark.slow  # real melora-lit processes
@pytest.mark.parametrize("case", list(CHANGES))
def test_a_resume_on_other_data_or_another_backbone_is_refused(changes, base, case):
    """A training file of as many rows and bytes with its labels flipped, a validation file
    rewritten in place, a backbone of the same config and shapes with other weights: each resume
    is refused in one line that names the part, the file and how it changed (before: each
    resumed silently), and leaves the run folder byte-identical."""
    result = changes[case]
    message = error_line(result["proc"]).replace(str(base["work"]), "$WORK")
    print(f"{case}: exit {result['proc'].returncode}: {message}")
    assert result["proc"].returncode == 2 and CHANGES[case][2] in message, message
    assert f"pass --accept_change {CHANGES[case][0]} to train on with this one" in message
    assert result["after"] == result["before"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CHANGES))
def test_an_accepted_change_resumes_and_is_recorded(changes, base, case):
    """The same resume with ``--accept_change PART`` says what it accepted in one line, trains on
    and records the new fingerprint; ``config.yaml`` does not keep the acceptance."""
    root, args, part = changes[case]["root"], changes[case]["args"], CHANGES[case][0]
    proc = run_cli("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root),
                   "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last", "--trainer.max_epochs", "2",
                   "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", *args,
                   "--accept_change", part, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"melora-lit: --accept_change {part}: " in proc.stderr and "Traceback" not in proc.stderr
    run = root / "lightning_logs" / "version_0"
    newest = max((run / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)  # last-v1: a copy
    recorded = _load(newest)["callbacks"]["RunFingerprint"]
    from melora_lit.fingerprint import file_fingerprint

    if part == "backbone":
        assert recorded["backbone"]["source"] == args[-1]
        weights = file_fingerprint(Path(args[-1]) / "model.safetensors")  # a small file: hashed whole
        assert recorded["backbone"]["weights"] == [{"file": "model.safetensors", "size": weights["size"],
                                                    "sha256": weights["sha256"]}]
    else:
        name = "train" if part == "train_data" else "val"
        assert recorded["data"][name]["files"] == [file_fingerprint(args[1])]
    assert "accept_change: null" in (run / "config.yaml").read_text()


def test_an_accepted_training_data_change_that_changes_the_epochs_is_refused_naming_it(base):
    """A training file with more rows, accepted, whose epochs would have more batches: still
    refused (Lightning would cut the next epoch short), and the message names the data's change,
    not only the batch size; nothing written."""
    root = _copy(base, "longer-train")
    longer = write_csv(base["work"] / "longer_train.csv", sentiment_rows(80, seed=3))
    before = tree_hashes(root)
    proc = run_cli("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                   "--trainer.max_epochs", "2", "--data.init_args.train_file", str(longer),
                   "--accept_change", "train_data", timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = error_line(proc)
    assert "epoch of 6 batches per process" in message and "this run's epochs have 8" in message
    assert f"; the training data changed (train file {longer} changed (" in message and "rows 48 -> 60)" in message
    assert tree_hashes(root) == before
