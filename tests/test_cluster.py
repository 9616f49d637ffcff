"""Two nodes on loopback, as a cluster runs them: two ``melora-lit launch`` processes (one per
"node", 1 worker each, gloo, a shared root folder), signalled as schedulers signal them.

What is promised (docs/multinode.md, docs/errors.md): a preemption (SIGTERM or SIGUSR1, to the
launchers or to one worker) ends every node with status 3 after one resumable save, from which
``--ckpt_path auto`` resumes to the uninterrupted run's result exactly; no worker outlives its
launcher; a lost rank (SIGKILL) ends the other node with status 75 and one line, within the
collective timeout; in-place restarts are refused in one line.

Every run trains the same tiny BERT (dropout on) on 32 rows, batch 4 per process: 4 steps per
epoch, 2 epochs, ``last.ckpt`` after every step. A signal arrives at a step chosen exactly:
each worker pauses after that step (:class:`PauseAt`) until the test has sent it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
COLLECTIVE_TIMEOUT = 30  # seconds: --collective_timeout of the runs (the lost-peer bound)
STEPS, STOP_AT = 8, 3  # 2 epochs of 4 steps; the signal comes after step 3 (mid-epoch)


class PauseAt(Callback):
    """A callback for the workers (in the runs' config; tests/ is on their ``PYTHONPATH``): after
    optimizer step ``step``, write ``{ready}.rank{R}`` and wait until the test writes the file
    ``go``, which lists the ranks that are sent a signal; a listed rank also waits until its stop
    request is recorded (so the signal is taken before the step's stop check)."""

    def __init__(self, step: int, ready: str, go: str) -> None:
        self.step, self.ready, self.go = step, ready, go

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from melora_lit.run import preemption

        if trainer.global_step != self.step:
            return
        Path(f"{self.ready}.rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + TIMEOUT
        while not Path(self.go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        signalled = str(trainer.global_rank) in Path(self.go).read_text().split(",")
        while signalled and preemption.requested(trainer) is None and time.monotonic() < deadline:
            time.sleep(0.01)


# ----------------------------------------------------------------------------- set-up
@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dropout_bert) -> dict:
    from support import sentiment_rows, write_csv

    work = tmp_path_factory.mktemp("cluster")
    rows = list({r["review"]: r for r in sentiment_rows(80, seed=5)}.values())[:40]
    return {"work": work, "model": dropout_bert, "csv": write_csv(work / "train.csv", rows)}


def config(cluster: dict, name: str, pause: bool = True) -> tuple[Path, Path]:
    """The run's config and root folder; with ``pause``, each worker pauses after step
    :data:`STOP_AT` until ``WORK/NAME.go`` exists (:class:`PauseAt`)."""
    from support import csv_classification_data, write_run_config

    root = cluster["work"] / name
    pauses = [{"class_path": "test_cluster.PauseAt", "init_args": {
        "step": STOP_AT, "ready": str(cluster["work"] / f"{name}.ready"), "go": str(cluster["work"] / f"{name}.go")}}]
    cfg = write_run_config(
        cluster["work"] / f"{name}.yaml", root, seed=42,
        model={"model_name_or_path": cluster["model"], "learning_rate": 2e-2, "head_learning_rate": 2e-2,
               "warmup_ratio": 0.0, "melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.1,
                                               "target_modules": ["query", "value"]}},
        data=csv_classification_data(cluster["csv"], val_size=0.2, batch_size=4, max_length=32),
        trainer={"max_epochs": STEPS // 4, "gradient_clip_val": 1.0, "strategy": "ddp", "num_nodes": 2,
                 **({"callbacks": pauses} if pause else {})},
        extra={"checkpoint": {"every_n_train_steps": 1}, "collective_timeout": COLLECTIVE_TIMEOUT})
    return cfg, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Two ``melora-lit launch`` processes as nodes 0 and 1 (fresh interpreters: the launcher is
    what is tested), their workers marked by an environment variable (to find them, and to find
    any left behind)."""

    def __init__(self, cluster: dict, cfg: Path, *args: str, node_args: dict[int, list[str]] | None = None) -> None:
        self.mark = uuid.uuid4().hex
        self.ready, self.go = cfg.with_suffix(".ready"), cfg.with_suffix(".go")  # config()'s PauseAt
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", MELORA_TEST_CLUSTER=self.mark,
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
        port = str(free_port())
        self.logs = [cluster["work"] / f"{self.mark}-node{r}.log" for r in (0, 1)]
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "melora_lit", "launch", "--nnodes", "2", "--nproc-per-node", "1",
                              "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port,
                              "fit", "--config", str(cfg), "--trainer.devices", "1", *args,
                              *(node_args or {}).get(r, [])],
                             cwd=ROOT, env=env, stdout=open(self.logs[r], "w"), stderr=subprocess.STDOUT)
            for r in (0, 1)]

    def wait_paused(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not all(Path(f"{self.ready}.rank{r}").exists() for r in (0, 1)):
            assert all(p.poll() is None for p in self.procs) and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def release(self, *signalled: int) -> None:
        self.go.write_text(",".join(map(str, signalled)))

    def worker(self, rank: int) -> int:
        for pid, env in self.marked():
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=0" in env:
                return pid
        raise AssertionError(f"no worker of rank {rank}")

    def marked(self) -> list[tuple[int, list[bytes]]]:
        """The live processes of this test's runs but the launchers: workers (and their loader workers)."""
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                env = environ.read_bytes().split(b"\0")
                if f"MELORA_TEST_CLUSTER={self.mark}".encode() in env and b"LOCAL_RANK=0" in env:
                    state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append((int(environ.parent.name), env))
            except (OSError, IndexError):
                continue
        return found

    def finish(self) -> list[tuple[int, float]]:
        """(status, seconds from now) of each node."""
        start, ends = time.monotonic(), {}
        try:
            while len(ends) < 2 and time.monotonic() - start < TIMEOUT:
                for r, p in enumerate(self.procs):
                    if r not in ends and p.poll() is not None:
                        ends[r] = (p.returncode, time.monotonic() - start)
                time.sleep(0.05)
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
        assert len(ends) == 2, self.output()
        return [ends[0], ends[1]]

    def output(self, rank: int | None = None) -> str:
        return "\n".join(log.read_text()[-4000:] for r, log in enumerate(self.logs) if rank in (None, r))


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the weights and AdamW moments of two checkpoints."""
    assert set(a["state_dict"]) == set(b["state_dict"]) and a["global_step"] == b["global_step"]
    diffs = [(a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert set(sa) == set(sb) and len(sa) == len(a["state_dict"])
    return max(diffs + [(sa[i][m] - sb[i][m]).abs().max().item() for i in sa for m in ("exp_avg", "exp_avg_sq")])


def last_ckpt(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def uninterrupted(cluster) -> dict:
    cfg, root = config(cluster, "uninterrupted", pause=False)
    nodes = Nodes(cluster, cfg)
    assert [status for status, _ in nodes.finish()] == [0, 0], nodes.output()
    return {"root": root, "last": load(last_ckpt(root))}


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_to_both_launchers_stops_every_node_with_3_and_auto_resumes_exactly(cluster, uninterrupted):
    cfg, root = config(cluster, "term-launchers")
    nodes = Nodes(cluster, cfg, "--ckpt_path", "auto")
    nodes.wait_paused()
    for p in nodes.procs:
        p.send_signal(signal.SIGTERM)
    nodes.release(0, 1)
    assert [status for status, _ in nodes.finish()] == [3, 3], nodes.output()
    out = nodes.output()
    assert f"melora-lit: received SIGTERM: stopped after step {STOP_AT}, last checkpoint {last_ckpt(root)}" in out
    assert lines(out, "melora-lit launch:") == ["melora-lit launch: the workers of this node ended with rank 0: 3 "
                                               "(exit status 3)", "melora-lit launch: the workers of this node ended "
                                               "with rank 1: 3 (exit status 3)"]
    assert "Traceback" not in out and not nodes.marked()
    saved = load(last_ckpt(root))
    assert saved["global_step"] == STOP_AT

    # the whole job restarted, as a scheduler does: --ckpt_path auto resumes it
    resumed = Nodes(cluster, cfg, "--ckpt_path", "auto")  # past step 3: no pause
    assert [status for status, _ in resumed.finish()] == [0, 0], resumed.output()
    assert f"melora-lit: resuming from {last_ckpt(root)}" in resumed.output(0)
    diff = max_abs_diff(load(last_ckpt(root)), uninterrupted["last"])
    print(f"SIGTERM to both launchers after step {STOP_AT}, resumed with --ckpt_path auto: max abs diff to the "
          f"uninterrupted run (adapter, head, AdamW moments) {diff!r}")
    assert diff == 0.0


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_node_with_3(cluster):
    cfg, root = config(cluster, "term-worker")
    nodes = Nodes(cluster, cfg)
    nodes.wait_paused()
    os.kill(nodes.worker(1), signal.SIGTERM)
    nodes.release(1)
    assert [status for status, _ in nodes.finish()] == [3, 3], nodes.output()
    assert f"received SIGTERM: stopped after step {STOP_AT}" in nodes.output(0) and "Traceback" not in nodes.output()
    assert load(last_ckpt(root))["global_step"] == STOP_AT and not nodes.marked()


@pytest.mark.slow
def test_sigusr1_to_both_launchers_then_sigterm_to_every_worker_stops_once_with_3_and_leaves_no_worker(cluster):
    """SIGUSR1 (SLURM's --signal), then SIGTERM to every process (scancel): one stop, one save.
    Plain torchrun ended at SIGUSR1 at once (status 138), its workers training on, orphaned."""
    cfg, root = config(cluster, "usr1-launchers")
    nodes = Nodes(cluster, cfg)
    nodes.wait_paused()
    workers = [nodes.worker(0), nodes.worker(1)]
    for p in nodes.procs:
        p.send_signal(signal.SIGUSR1)
    time.sleep(1)  # the launchers pass it on within 0.1 s
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    nodes.release(0, 1)
    assert [status for status, _ in nodes.finish()] == [3, 3], nodes.output()
    assert lines(nodes.output(0), "melora-lit: received") == [
        f"melora-lit: received SIGUSR1: stopped after step {STOP_AT}, last checkpoint {last_ckpt(root)}; rerun with "
        f"--ckpt_path last to resume (exit status 3)"]
    assert not nodes.marked() and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert load(last_ckpt(root))["global_step"] == STOP_AT


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_node_with_75_and_one_line_within_the_collective_timeout(cluster):
    from support import tree_hashes

    cfg, root = config(cluster, "kill-worker")
    nodes = Nodes(cluster, cfg)
    nodes.wait_paused()
    os.kill(nodes.worker(1), signal.SIGKILL)
    time.sleep(0.5)
    checkpoints = tree_hashes(last_ckpt(root).parent)
    nodes.release()
    (status0, seconds), (status1, _) = nodes.finish()
    out = nodes.output(0)
    print(f"rank 1 killed: node 0 ended {status0} after {seconds:.1f} s; node 1 {status1}")
    assert (status0, status1) == (75, 128 + signal.SIGKILL), nodes.output()
    assert seconds < COLLECTIVE_TIMEOUT + 30
    [line] = lines(out, "melora-lit: error:")
    assert re.fullmatch(rf"melora-lit: error: lost contact with another process of the run \(this is rank 0 of 2\) "
                        rf"during fit: .+; the last checkpoint is {re.escape(str(last_ckpt(root)))}; restart the whole "
                        rf"job with --ckpt_path auto", line), line
    assert "Traceback" not in out and "(killed by SIGKILL)" in nodes.output(1)
    assert tree_hashes(last_ckpt(root).parent) == checkpoints  # the last save is whole, and kept
    assert not nodes.marked()


@pytest.mark.slow
def test_a_rank_that_never_joins_ends_the_others_within_the_collective_timeout(cluster):
    """Process-group set-up is bounded by --collective_timeout too: rank 1 refuses its input
    (status 2), rank 0 waits for it 10 s, then ends with 75 (torch's default: 30 minutes)."""
    cfg, root = config(cluster, "never-joins", pause=False)
    nodes = Nodes(cluster, cfg, "--collective_timeout", "10", node_args={1: ["--model.melora.r", "0"]})
    (status0, seconds), (status1, _) = nodes.finish()
    print(f"rank 1 refused its input: node 0 ended {status0} after {seconds:.1f} s; node 1 {status1}")
    assert (status0, status1) == (75, 2) and seconds < 10 + 30, nodes.output()
    [line] = lines(nodes.output(0), "melora-lit: error:")
    assert re.fullmatch(r"melora-lit: error: lost contact with another process of the run \(this is rank 0 of 2\) "
                        r"during fit: wait timeout after 10000ms, keys: .+; the last checkpoint is none; restart the "
                        r"whole job with --ckpt_path auto", line), line
    assert lines(nodes.output(1), "melora-lit: error:") == ["melora-lit: error: r=0 is not valid; r must be an "
                                                            "integer >= 1"]
    assert not list(root.rglob("version_*")) and not nodes.marked()  # the failed run's folder removed


@pytest.mark.slow
def test_a_node_that_never_comes_ends_the_launcher_with_75_and_a_stop_while_waiting_with_3(cluster):
    cfg, root = config(cluster, "alone")
    proc = subprocess.run([sys.executable, "-m", "melora_lit", "launch", "--nnodes", "2", "--nproc-per-node", "1",
                           "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "--rdzv-conf", "timeout=3", "fit", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    [line] = lines(proc.stderr, "melora-lit: error:")
    assert proc.returncode == 75 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(r"melora-lit: error: launch: lost contact with the other nodes before the workers started: "
                        r"Timed out after \d+ seconds waiting for clients\. 1/2 clients joined; restart the whole job "
                        r"\(--rdzv-conf timeout=SECONDS: how long the nodes wait for each other, default 900\)", line)
    assert not root.exists()

    # a stop signal while the launcher waits for the other nodes (torch's agent blocked in C++)
    proc = subprocess.Popen([sys.executable, "-m", "melora_lit", "launch", "--nnodes", "2", "--nproc-per-node", "1",
                             "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                             "fit", "--config", str(cfg)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    err = proc.communicate(timeout=TIMEOUT)[1]
    assert proc.returncode == 3 and time.monotonic() - sent < 10, err[-3000:]
    assert lines(err, "melora-lit") == ["melora-lit launch: received SIGTERM before the workers started: nothing "
                                        "trained or written (exit status 3)"]
    assert not root.exists()


# ----------------------------------------------------------------------------- refused, in-process
REFUSED = {
    "max_restarts": ["--nnodes", "2", "--max-restarts", "1", "fit", "--config", "CFG"],
    "no_python": ["--nnodes", "1", "--no-python", "fit", "--config", "CFG"],
    "not_a_command": ["--nnodes", "1", "train", "--config", "CFG"],
    "no_command": ["--nnodes", "1"],
}


@pytest.fixture(scope="module")
def refused(cluster) -> dict:
    """``melora-lit launch`` of each case, in this process: status, stderr; the folder's hashes."""
    import contextlib
    import io

    from melora_lit import launch
    from support import tree_hashes

    cfg, _ = config(cluster, "refused", pause=False)
    before = tree_hashes(cluster["work"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    out = {}
    try:
        for case, args in REFUSED.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
                launch.main([str(cfg) if a == "CFG" else a for a in args])
            out[case] = (stop.value.code, err.getvalue())
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return {"results": out, "unchanged": tree_hashes(cluster["work"]) == before}


@pytest.mark.parametrize("case", list(REFUSED))
def test_launch_refuses_in_one_line_with_2_and_writes_nothing(refused, case):
    status, err = refused["results"][case]
    print(f"{case}: exit {status}: {err.strip()}")
    assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("melora-lit: error: launch")
    assert refused["unchanged"]


def test_docs_table_shows_each_launch_refusal_and_its_actual_message(refused):
    from support import errors_doc_rows

    rows = errors_doc_rows("test_cluster.py")
    assert set(rows) == set(REFUSED)
    for case in REFUSED:
        message = refused["results"][case][1].strip().removeprefix("melora-lit: error: ")
        assert rows[case] == message.replace("|", "\\|"), case


# ----------------------------------------------------------------------------- units
def test_a_node_status_is_its_workers():
    from melora_lit.run import job_status

    assert job_status([]) == 0 and job_status([0, 0]) == 0
    assert job_status([3, 3]) == 3 and job_status([0, 3]) == 3  # a preemption, whoever got the signal
    assert job_status([3, 2]) == 2 and job_status([1, 2]) == 2  # a bad input
    assert job_status([75, 3]) == 75 and job_status([-9, 3]) == 137 and job_status([1, 75]) == 1  # the first failure


def test_a_failed_collective_is_a_lost_peer_and_other_errors_are_not():
    import torch.distributed as dist

    from melora_lit.run import lost_peer

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:4263: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker. GLHF!")
    assert lost_peer(gloo) == "Read error [127.0.0.1]:4263: Connection reset by peer"
    store = dist.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")
    assert lost_peer(store) == "Timed out after 601 seconds waiting for clients. 1/2 clients joined"
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert lost_peer(outer) is not None
    assert lost_peer(RuntimeError("CUDA out of memory")) is None and lost_peer(ValueError("x")) is None


def test_the_collective_timeout_reaches_the_strategy_and_is_an_option(cluster, capsys):
    from datetime import timedelta

    from melora_lit.cli import cli_main

    cfg, _ = config(cluster, "timeout", pause=False)
    ddp, fsdp2 = str(ROOT / "configs/strategy/ddp.yaml"), str(ROOT / "configs/strategy/fsdp2.yaml")
    for args, expected in ((["--trainer.strategy", "ddp"], COLLECTIVE_TIMEOUT),
                           (["--config", fsdp2, "--collective_timeout", "5"], 5),
                           (["--config", ddp, "--collective_timeout", "null"], 1800),
                           (["--config", ddp, "--trainer.strategy.init_args.timeout", "0:00:07"], 7)):
        cli = cli_main(["--config", str(cfg), "--trainer.devices", "1", "--trainer.num_nodes", "1", *args], run=False)
        assert cli.trainer.strategy._timeout == timedelta(seconds=expected), args
        strategy = cli.config.trainer.strategy  # config.yaml keeps what was given, not a copy of the timeout
        assert strategy == "ddp" if args[1] == "ddp" else strategy.init_args.timeout in (timedelta(minutes=30),
                                                                                          timedelta(seconds=7))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    assert "--collective_timeout" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(cfg), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["collective_timeout"] == COLLECTIVE_TIMEOUT
