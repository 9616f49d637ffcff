"""SLURM preemption and requeue, in a simulated SLURM job (issue 24).

Each task is a real ``melora-lit`` process with the variables ``srun`` sets (as Lightning's
``SLURMEnvironment`` reads them; the job is not named ``bash``, which Lightning takes for an
interactive shell) and a fake ``scontrol`` on ``PATH`` that records its arguments. SIGUSR1 (what
``#SBATCH --signal=USR1@T`` sends before the time limit) saves ``last.ckpt``, then global rank 0
requeues the job itself, once, and every task exits 3; Lightning's own requeue, which wrote an
``hpc_ckpt_N.ckpt`` beside the run and requeued before melora-lit's save, is off. SIGTERM
(``scancel``, preemption) saves and exits 3 without a requeue. The requeued job (the same command,
the same job id) resumes its ``version_<job id>`` with ``--ckpt_path auto`` to the weights of an
uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from melora_lit.errors import EXIT_PREEMPTED
from melora_lit.run import cluster_plugins, requeue_slurm_job
from support import melora_popen, run_cli, sentiment_rows, with_tests_on_path, write_config, write_csv

ROOT = Path(__file__).resolve().parents[1]
LOG = "scontrol.log"  # what the fake scontrol records, beside its bin/ folder


@pytest.fixture(scope="module")
def job(tmp_path_factory, dropout_bert) -> dict:
    """The job's config (1 epoch of 6 steps, dropout on) and a folder with a fake ``scontrol``."""
    work = tmp_path_factory.mktemp("slurm")
    train = write_csv(work / "train.csv", sentiment_rows(64, seed=3))
    cfg = write_config(work / "config.yaml", dropout_bert, train, work / "unused", trainer={"max_epochs": 1})
    return {"work": work, "cfg": cfg}


def fake_scontrol(folder: Path, status: int = 0, said: str = "") -> Path:
    """``folder/bin/scontrol``: appends its arguments to ``folder/scontrol.log``, prints ``said``
    to stderr and exits ``status``."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    script = folder / "bin" / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / LOG}"\n' + (f'echo "{said}" >&2\n' if said else "")
                      + f"exit {status}\n")
    script.chmod(0o755)
    return folder / "bin"


def slurm_env(job_id: str, bin_dir: Path | None, procid: int = 0, ntasks: int = 1, **extra: str) -> dict[str, str]:
    """The environment of task ``procid`` of a one-node SLURM job of ``ntasks`` tasks."""
    path = os.environ["PATH"] if bin_dir is None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return with_tests_on_path(
        PATH=path, SLURM_JOB_ID=job_id, SLURM_JOB_NAME="melora", SLURM_NTASKS=str(ntasks),
        SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_NNODES="1", SLURM_NODELIST="localhost", SLURM_NODEID="0",
        SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid), OMP_NUM_THREADS="1", **extra)


def signal_hook(folder: Path, signame: str, step: int) -> Path:
    """A config adding tests/signal_at.py's callback: ``signame`` to the task itself after ``step``."""
    hook = folder / f"{signame}-{step}.yaml"
    hook.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "signal_at.SignalAt", "init_args": {
        "signame": signame, "moment": "train_batch_end", "step": step}}]}}))
    return hook


def fit(job: dict, root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_cli("fit", "--config", str(job["cfg"]), "--trainer.default_root_dir", str(root), *args, env=env,
                   cwd=ROOT)


def ckpts(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.ckpt"))


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over the adapter and head weights and the AdamW moments."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert a["global_step"] == b["global_step"] and set(a["state_dict"]) == set(b["state_dict"])
    diffs = [(a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    diffs += [(sa[i][m] - sb[i][m]).abs().max().item() for i in sa for m in ("exp_avg", "exp_avg_sq")]
    return max(diffs)


# ----------------------------------------------------------------------------- one task
@pytest.mark.slow
def test_sigusr1_saves_requeues_once_and_the_requeued_job_resumes_exactly(job, tmp_path):
    """SIGUSR1 at step 3 of 6: ``last.ckpt`` of step 3 in ``version_<job id>``, ``scontrol requeue
    <id>`` once, one line saying so, exit 3, no ``hpc_ckpt``; the same command again (the requeued
    job: same id, ``--ckpt_path auto``) resumes there and ends with the weights and AdamW moments
    of an uninterrupted job (max abs diff 0.0)."""
    bin_dir = fake_scontrol(tmp_path)
    hook = signal_hook(tmp_path, "SIGUSR1", 3)
    # the uninterrupted job: the same callbacks, its signal never sent
    reference = fit(job, tmp_path / "reference", slurm_env("4241", bin_dir), "--config",
                    str(signal_hook(tmp_path, "SIGUSR1", 99)))
    assert reference.returncode == 0, reference.stderr[-3000:]

    root, env = tmp_path / "runs", slurm_env("4242", bin_dir)
    run = root / "lightning_logs" / "version_4242"
    first = fit(job, root, env, "--config", str(hook), "--ckpt_path", "auto")
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    assert "received SIGUSR1: stopped after step 3" in first.stderr and "Traceback" not in first.stderr
    lines = [line for line in first.stderr.splitlines() if "SLURM job" in line]
    assert lines == ["melora-lit: requeued SLURM job 4242 (scontrol requeue 4242): it starts again under the same job "
                     "id and, run with --ckpt_path auto, resumes from last.ckpt"], first.stderr[-3000:]
    assert (tmp_path / LOG).read_text() == "requeue 4242\n"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert not list(tmp_path.rglob("hpc_ckpt*")), ckpts(tmp_path)

    requeued = fit(job, root, env, "--config", str(hook), "--ckpt_path", "auto")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {last}" in requeued.stderr and "melora-lit: after 6 steps" in requeued.stderr
    diff = max_abs_diff(last, tmp_path / "reference" / "lightning_logs" / "version_4241" / "checkpoints" / "last.ckpt")
    print(f"requeued job vs uninterrupted job at step 6: max abs diff {diff!r}")
    assert diff == 0.0
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_4242"]
    assert (tmp_path / LOG).read_text() == "requeue 4242\n" and not list(tmp_path.rglob("hpc_ckpt*"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_3_without_a_requeue(job, tmp_path):
    """``scancel`` and preemption send SIGTERM: the same save and status, no ``scontrol`` (SLURM
    requeues a preempted ``--requeue`` job itself), no ``hpc_ckpt``."""
    bin_dir = fake_scontrol(tmp_path)
    proc = fit(job, tmp_path / "runs", slurm_env("4250", bin_dir), "--config",
               str(signal_hook(tmp_path, "SIGTERM", 2)))
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "received SIGTERM: stopped after step 2" in proc.stderr and "SLURM job" not in proc.stderr
    assert not (tmp_path / LOG).exists()
    assert ckpts(tmp_path / "runs") == ["lightning_logs/version_4250/checkpoints/last.ckpt"]


@pytest.mark.slow
def test_lightnings_requeue_handler_does_not_run_under_the_python_api(job, tmp_path, monkeypatch):
    """``cli_main`` called by a Python program, where no ``melora-lit`` entry point takes the
    signals before Lightning: before, Lightning's SLURM handler answered SIGUSR1 in the middle of
    the step with an ``hpc_ckpt_1.ckpt`` in ``default_root_dir`` and ``scontrol requeue``, before
    melora-lit's save. Now only the run's ``last.ckpt`` is written (and the requeue is the
    ``melora-lit`` command's, after its save)."""
    from melora_lit.cli import cli_main
    from melora_lit.run import preemption

    for key, value in slurm_env("4270", fake_scontrol(tmp_path)).items():
        if key.startswith("SLURM_") or key == "PATH":
            monkeypatch.setenv(key, value)
    for name in ("is_stopping", "signal", "early"):  # the process-wide policy, as it was after the test
        monkeypatch.setattr(preemption, name, getattr(preemption, name))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(SystemExit):  # Lightning's stop (SIGTERMException)
            cli_main(["fit", "--config", str(job["cfg"]), "--config", str(signal_hook(tmp_path, "SIGUSR1", 2)),
                      "--trainer.default_root_dir", str(tmp_path / "runs")])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert ckpts(tmp_path / "runs") == ["lightning_logs/version_4270/checkpoints/last.ckpt"]
    assert not (tmp_path / LOG).exists()


# ----------------------------------------------------------------------------- two tasks
@pytest.mark.slow
def test_two_tasks_sigusr1_both_exit_3_and_rank_0_requeues_once(job, tmp_path):
    """Two ``srun`` tasks on one node (DDP, gloo), SIGUSR1 to each at step 3: one save, both
    exit 3, ``scontrol requeue`` called once (by rank 0), no ``hpc_ckpt``."""
    bin_dir = fake_scontrol(tmp_path)
    hook = signal_hook(tmp_path, "SIGUSR1", 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [melora_popen("fit", "--config", str(job["cfg"]), "--config", str(hook), "--config",
                          str(ROOT / "configs/strategy/ddp.yaml"), "--trainer.devices", "2",
                          "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "runs"),
                          env=slurm_env("4260", bin_dir, procid=rank, ntasks=2, MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=port),
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errs = []
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED], errs[0][-3000:] + errs[1][-3000:]
    assert "received SIGUSR1: stopped after step 3" in errs[0] and "requeued SLURM job 4260" in errs[0]
    assert "SLURM job" not in errs[1] and not any("Traceback" in e for e in errs)
    assert (tmp_path / LOG).read_text() == "requeue 4260\n"
    run = tmp_path / "runs" / "lightning_logs" / "version_4260" / "checkpoints"
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    assert not list(tmp_path.rglob("hpc_ckpt*")), ckpts(tmp_path)


# ----------------------------------------------------------------------------- in-process parts
@pytest.mark.parametrize("case", ["requeued", "failed", "missing", "rank_1", "interactive", "array"])
def test_the_requeue_says_what_it_did_in_one_line(tmp_path, monkeypatch, capsys, case):
    """Only global rank 0 of a SLURM job requeues; a missing or failing ``scontrol`` is one line
    saying the job was not requeued and why (no traceback, the status stays 3); an ``srun --pty
    bash`` session is no SLURM job to Lightning, nor here."""
    bin_dir = fake_scontrol(tmp_path, *((1, "scontrol: error: Invalid job id specified") if case == "failed" else ()))
    env = slurm_env("77", None if case == "missing" else bin_dir, procid=1 if case == "rank_1" else 0)
    env.update({"interactive": {"SLURM_JOB_NAME": "bash"},
                "array": {"SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}}.get(case, {}))
    if case == "missing":
        env["PATH"] = str(tmp_path / "empty")
    for key in [k for k in os.environ if k.startswith("SLURM_") or k == "RANK"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    requeue_slurm_job()
    err = capsys.readouterr().err
    called = (tmp_path / LOG).read_text() if (tmp_path / LOG).exists() else ""
    expected = {
        "requeued": ("requeue 77\n", "melora-lit: requeued SLURM job 77 (scontrol requeue 77): it starts again under "
                                     "the same job id and, run with --ckpt_path auto, resumes from last.ckpt\n"),
        "failed": ("requeue 77\n", "melora-lit: SLURM job 77 was not requeued: 'scontrol requeue 77' failed with exit "
                                   "status 1: scontrol: error: Invalid job id specified; submit it again (with "
                                   "--ckpt_path auto) to resume\n"),
        "missing": ("", "melora-lit: SLURM job 77 was not requeued: scontrol is not on PATH; submit it again (with "
                        "--ckpt_path auto) to resume\n"),
        "rank_1": ("", ""),
        "interactive": ("", ""),
        "array": ("requeue 70_3\n", "melora-lit: requeued SLURM job 70_3 (scontrol requeue 70_3): it starts again "
                                    "under the same job id and, run with --ckpt_path auto, resumes from last.ckpt\n"),
    }[case]
    assert (called, err) == expected


def test_lightnings_own_slurm_requeue_is_off(monkeypatch):
    """Under SLURM the trainer gets ``SLURMEnvironment(auto_requeue=False)`` (Lightning then
    installs no SIGUSR1 handler and writes no ``hpc_ckpt``); one the user gives is set so; under
    torchrun (inside SLURM too) and outside SLURM the plugins stay as given."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    for key in [k for k in os.environ if k.startswith("SLURM_") or k in ("RANK", "LOCAL_RANK", "GROUP_RANK",
                                                                        "WORLD_SIZE", "TORCHELASTIC_RUN_ID")]:
        monkeypatch.delenv(key)
    assert cluster_plugins(None) is None
    for key, value in slurm_env("5", None).items():
        if key.startswith("SLURM_"):
            monkeypatch.setenv(key, value)
    (added,) = cluster_plugins(None)
    assert isinstance(added, SLURMEnvironment) and added.auto_requeue is False
    given = SLURMEnvironment()
    assert cluster_plugins([given]) == [given] and given.auto_requeue is False
    own = LightningEnvironment()
    assert cluster_plugins(own) is own
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    assert cluster_plugins(None) is None
