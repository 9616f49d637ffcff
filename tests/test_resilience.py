"""Nothing lost: exact resume after SIGKILL, preemption by SIGTERM/SIGUSR1, atomic checkpoint
writes, the non-finite guard and safe loading, with real ``melora-lit`` processes.

Every run trains the same 2-layer BERT with backbone dropout and adapter dropout on (so the RNG
states matter) for 2 epochs of 6 steps, with a checkpoint after every step. The reference run
is uninterrupted; the others are killed or stopped at seeded random steps and resumed with
``--ckpt_path last``: they must end with the same adapter weights, optimizer state and
validation metrics.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from support import (melora_env, melora_popen, run_cli, run_main, sentiment_rows, tree_hashes, with_tests_on_path,
                     write_config, write_csv)
from melora_lit.training.checkpoints import EXIT_PREEMPTED

TOTAL_STEPS = 12  # 2 epochs x 6 steps
CKPT_ARGS = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"]


def _ckpts(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _step_file(root: Path, step: int) -> Path:
    found = list(_ckpts(root).glob(f"epoch=*-step={step}.ckpt"))
    assert len(found) == 1, (step, sorted(p.name for p in _ckpts(root).glob("*")))
    return found[0]


def _max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the weights and the optimizer moments of two checkpoints."""
    assert set(a["state_dict"]) == set(b["state_dict"])
    diffs = [(a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        diffs += [(sa[m] - sb[m]).abs().max().item() for m in ("exp_avg", "exp_avg_sq")]
    return max(diffs)


def _progress(ckpt: dict) -> dict:
    """The fit loop's progress counters (epochs, batches, validation batches) in a checkpoint:
    what Lightning resumes from. Equal to the uninterrupted run's at the same step, or a resumed
    run would count its epochs differently (and retrain one)."""
    return {k: v for k, v in ckpt["loops"]["fit_loop"].items() if k.endswith("progress")}


def _final_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("melora-lit: after "))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dropout_bert) -> dict:
    work = tmp_path_factory.mktemp("resilience")
    train = write_csv(work / "train.csv", sentiment_rows(64, seed=3))
    return {"work": work, "model": dropout_bert, "train": train}


def _config(setup: dict, name: str, **kw) -> tuple[Path, Path]:
    root = setup["work"] / name
    return write_config(setup["work"] / f"{name}.yaml", setup["model"], setup["train"], root, **kw), root


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """The uninterrupted run, every step's checkpoint kept."""
    cfg, root = _config(setup, "reference")
    proc = run_main("fit", "--config", str(cfg), *CKPT_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _load(_ckpts(root) / "last.ckpt")
    assert last["global_step"] == TOTAL_STEPS
    return {"root": root, "last": last, "final": _final_line(proc.stderr), "cfg": cfg}


def _start(cfg: Path, *extra: str) -> subprocess.Popen:
    return melora_popen("fit", "--config", str(cfg), *CKPT_ARGS, *extra, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, root: Path, step: int, timeout: float = 240) -> None:
    """Until the step's checkpoint exists (it appears whole: written to a temp file, renamed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(_ckpts(root).glob(f"epoch=*-step={step}.ckpt")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_run(setup, reference):
    cfg, root = _config(setup, "killed")
    rng = random.Random(2024)  # kill points spread over both epochs, apart enough for overshoot
    kill_at = [rng.randint(1, 3), rng.randint(5, 7), rng.randint(9, 10)]
    resume: list[str] = []
    for k in kill_at:
        proc = _start(cfg, *resume)
        _wait_for_step(proc, root, k)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        # what the killed run left behind: a whole last.ckpt equal to the reference at that step
        last = _load(_ckpts(root) / "last.ckpt")
        step = last["global_step"]
        same_step = _load(_step_file(reference["root"], step))
        diff = _max_diff(last, same_step)
        print(f"killed at step >= {k}: last.ckpt at step {step}, max abs diff to the reference {diff:.3g}")
        assert diff == 0.0 and _progress(last) == _progress(same_step)
        resume = ["--ckpt_path", "last"]
    proc = run_main("fit", "--config", str(cfg), *CKPT_ARGS, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    final = _load(_ckpts(root) / "last.ckpt")
    diff = _max_diff(final, reference["last"])
    print(f"final: max abs diff to the uninterrupted run {diff:.3g}; {_final_line(proc.stderr)}")
    assert final["global_step"] == TOTAL_STEPS and diff == 0.0
    assert _final_line(proc.stderr) == reference["final"]
    assert not (root / "lightning_logs" / "version_1").exists()  # one run folder throughout


# SIGUSR1 with 2 loader workers: they draw indices batches ahead of the loop, and the resumed
# run must still continue right after the last batch trained on (same data as without workers)
@pytest.mark.slow
@pytest.mark.parametrize("signame, workers", [("SIGTERM", 0), ("SIGUSR1", 2)])
def test_preemption_signal_saves_last_exits_3_and_resumes_exactly(setup, reference, signame, workers):
    cfg, root = _config(setup, f"preempted-{signame}")
    loader = ("--data.init_args.num_workers", str(workers))
    # checkpoints every 4 steps: the signal's own save is what keeps the steps in between
    proc = melora_popen("fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "4",
                        "--checkpoint.save_top_k", "-1", *loader, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True)
    _wait_for_step(proc, root, 4)
    os.kill(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert f"received {signame}: stopped after step" in err and "Traceback" not in err
    last = _load(_ckpts(root) / "last.ckpt")
    step = last["global_step"]
    print(f"{signame}: exit {proc.returncode}, last.ckpt at step {step}")
    assert 4 <= step < TOTAL_STEPS
    assert _max_diff(last, _load(_step_file(reference["root"], step))) == 0.0

    proc = run_main("fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "4",
                   "--checkpoint.save_top_k", "-1", *loader, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _load(_ckpts(root) / "last.ckpt")
    assert final["global_step"] == TOTAL_STEPS and _max_diff(final, reference["last"]) == 0.0
    assert _final_line(proc.stderr) == reference["final"]


def _signal_at(setup: dict, signame: str, moment: str, step: int) -> list[str]:
    """Config arguments adding :class:`signal_at.SignalAt` to a run's callbacks."""
    path = setup["work"] / f"signal-{signame}-{moment}-{step}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "signal_at.SignalAt", "init_args": {"signame": signame, "moment": moment, "step": step}}]}}))
    return ["--config", str(path)]


@pytest.mark.slow
@pytest.mark.parametrize("start, signame, moment, step", [
    (0, "SIGUSR1", "train_batch_end", 6),  # the last batch of epoch 0
    (0, "SIGTERM", "validation", 6),  # during epoch 0's validation
    (0, "SIGUSR1", "validation", 6),
    (6, "SIGTERM", "train_batch_end", 12),  # resumed at the end of epoch 0; the last batch of all
    (6, "SIGUSR1", "train_batch_end", 9),  # resumed at the end of epoch 0; mid-epoch 1
])
def test_stop_at_an_epoch_boundary_then_resume_gives_the_uninterrupted_run(setup, reference, start, signame,
                                                                           moment, step):
    """A preemption signal at the moments where Lightning's loop state is delicate: the last
    batch of an epoch, during the epoch-end validation, and in a run resumed from an epoch's end.
    Lightning 2.6 resumes a checkpoint saved after an epoch's last batch (before validation) into
    an epoch it does not count: a stop in that epoch then resumed as a finished epoch and trained
    it again (18 steps instead of 12). The run exits 3; ``--ckpt_path last`` ends bit-identical."""
    cfg, root = _config(setup, f"boundary-{start}-{signame}-{moment}-{step}")
    first = ["--ckpt_path", str(_step_file(reference["root"], start))] if start else []
    before = tree_hashes(reference["root"])  # the run resumed from is another run's: left as it was
    proc = run_cli("fit", "--config", str(cfg), *CKPT_ARGS, *first, *_signal_at(setup, signame, moment, step),
                   env=with_tests_on_path())
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    last = _load(_ckpts(root) / "last.ckpt")
    print(f"{signame} at {moment} of step {step}: last.ckpt at step {last['global_step']}")
    assert last["global_step"] >= step and _max_diff(last, _load(_step_file(reference["root"],
                                                                              last["global_step"]))) == 0.0
    proc = run_main("fit", "--config", str(cfg), *CKPT_ARGS, "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _load(_ckpts(root) / "last.ckpt")
    assert final["global_step"] == TOTAL_STEPS and _max_diff(final, reference["last"]) == 0.0
    assert tree_hashes(reference["root"]) == before


@pytest.mark.slow
def test_a_failure_during_a_checkpoint_write_leaves_the_last_checkpoint_whole(setup, reference, tmp_path):
    """RLIMIT_FSIZE makes the resumed run's first write of last.ckpt fail half-way (EFBIG, as a
    full disk would): the run dies, last.ckpt is untouched. TMPDIR is on another filesystem
    (/dev/shm), where Lightning's own write (temp file in TMPDIR, then shutil.move) is a copy."""
    ckdir = tmp_path / "ckpts"
    ckdir.mkdir()
    last = ckdir / "last.ckpt"
    shutil.copy(_ckpts(reference["root"]) / "last.ckpt", last)
    before = last.read_bytes()
    limit = len(before) // 2

    args = ["fit", "--config", str(reference["cfg"]),
            "--trainer.default_root_dir", str(tmp_path / "root"), "--checkpoint.dirpath", str(ckdir),
            "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "0",
            # a new folder: without this Lightning would write last-v1.ckpt, not over last.ckpt
            "--checkpoint.enable_version_counter", "false",
            "--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    tmpdir = "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)
    # in the process: no file may grow past half a checkpoint
    proc = run_cli(*args, env=melora_env(TMPDIR=tmpdir), file_size_limit=limit)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert last.read_bytes() == before  # untouched, and still loads
    assert _load(last)["global_step"] == TOTAL_STEPS
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.ckpt"]
    # a temp file as a SIGKILL mid-write leaves it (the SIGKILL test above kills mid-save too)
    (ckdir / ".melora-tmp-123-abcd").write_bytes(before[:limit])
    # the next run resumes from the intact last.ckpt and removes the stale temp file
    from melora_lit.cli import cli_main

    cli = cli_main(args)
    assert cli.trainer.global_step == TOTAL_STEPS + 6
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".melora-tmp-")]
    assert _load(last)["global_step"] == TOTAL_STEPS + 6


@pytest.mark.slow
def test_non_finite_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(setup):
    # a learning rate of 1e30 makes the first update enormous: the second step's loss is not finite
    cfg, root = _config(setup, "nan-stop", model_args={"learning_rate": 1e30, "head_learning_rate": 1e30,
                                                         "warmup_ratio": 0.0})
    proc = run_main("fit", "--config", str(cfg), *CKPT_ARGS)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    print(lines)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "non-finite" in lines[0] and "at optimizer step 2 " in lines[0] and "last.ckpt" in lines[0]
    last = _load(_ckpts(root) / "last.ckpt")
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert _max_diff(last, _load(_step_file(root, 1))) == 0.0
    assert not list(_ckpts(root).glob("epoch=*-step=2.ckpt"))


def test_skip_action_skips_non_finite_steps_and_counts_them(setup):
    """A forward hook makes the logits infinite at chosen steps: those steps are skipped (the
    weights stay as they were), counted, and training goes on with finite weights."""
    import lightning as L

    from melora_lit.cli import cli_main

    cfg, root = _config(setup, "nan-skip")
    cli = cli_main(["--config", str(cfg), "--nan_guard.action", "skip", "--trainer.max_epochs", "1"], run=False)
    bad_steps = {2, 4}
    seen: dict[int, dict] = {}

    class InjectInf(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step + 1
            seen[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if "lora_B" in k}
            if step in bad_steps and not hasattr(self, "hook"):
                self.hook = pl_module.model.classifier.register_forward_hook(lambda m, i, o: o * float("inf"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if hasattr(self, "hook"):
                self.hook.remove()
                del self.hook

    cli.trainer.callbacks.append(InjectInf())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 2.0
    for step in bad_steps:  # the weights after a skipped step are those before it
        assert all(torch.equal(seen[step][k], seen[step + 1][k]) for k in seen[step])
    assert not all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # a normal step moves them
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    # the count is saved with the checkpoint
    assert _load(_ckpts(root) / "last.ckpt")["callbacks"]["NonFiniteGuard"] == {"skipped_steps": 2}


@pytest.mark.slow
def test_checkpoints_are_plain_and_a_pickled_object_is_refused_in_one_line(setup, reference, tmp_path):
    import argparse

    last = reference["root"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain types only: loads
    assert {"ExactResume", "NonFiniteGuard"} <= set(ckpt["callbacks"])
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["sampler"]["seed"] == 42

    # the same checkpoint with a foreign pickled object in it
    ckpt["hyper_parameters"]["args"] = argparse.Namespace(lr=1.0)  # as old Lightning versions pickled
    bad = tmp_path / "foreign.ckpt"
    torch.save(ckpt, bad)
    proc = run_main("validate", "--config", str(reference["cfg"]), "--ckpt_path", str(bad))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    print(lines)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(bad) in lines[0] and "weights_only=True" in lines[0] and "argparse.Namespace" in lines[0]
    assert len(lines[0]) < 300


def test_trust_remote_code_is_off_by_default(capsys):
    import inspect

    import yaml

    from melora_lit.cli import cli_main
    from melora_lit.training.module import MELoRAModule, load_backbone

    assert inspect.signature(MELoRAModule).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_backbone).parameters["trust_remote_code"].default is False
    with pytest.raises(SystemExit):
        cli_main(["fit", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["trust_remote_code"] is False
    assert printed["nan_guard"] == {"action": "stop", "max_skipped": None}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("grouped", [False, True])
def test_loader_position_counts_batches_trained_on_not_indices_drawn(num_workers, grouped):
    """With workers the sampler runs batches ahead of the loop; a resumed loader must still
    continue right after the last batch the loop received: no sample repeated or skipped. The
    same for the length-grouped order of instruction data (group_by_length)."""
    from melora_lit.data.instruction import LengthGroupedSampler
    from melora_lit.loading import ResumableDataLoader, ResumableRandomSampler

    data = list(range(50))

    def loader() -> ResumableDataLoader:
        sampler = (LengthGroupedSampler([(i * 7) % 13 for i in data], 4, seed=3, mega_batch_mult=3) if grouped
                   else ResumableRandomSampler(data, seed=3))
        sampler.set_epoch(1)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler, num_workers=num_workers)

    reference = [int(i) for batch in loader() for i in batch]
    first = loader()
    it = iter(first)
    seen = [int(i) for _ in range(5) for i in next(it)]
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [int(i) for batch in resumed for i in batch]
    assert state["sampler"]["yielded"] == 20
    assert seen + rest == reference and sorted(reference) == data


@pytest.mark.slow
def test_soak_ten_sigkills_at_random_moments_end_bit_identical(setup, reference):
    """Ten SIGKILLs of one run at seeded random moments: while it starts up, at a random time
    after a step, or the moment a checkpoint write has begun (its temp file exists), each
    followed by ``--ckpt_path last``. Every surviving ``last.ckpt`` equals the uninterrupted run
    at its step, and the end is bit-identical (weights and AdamW moments, max abs diff 0); no
    temp file is left behind."""
    cfg, root = _config(setup, "soak")
    ckpts = _ckpts(root)
    rng = random.Random(11)
    moments = ["startup"] * 3 + ["write"] * 4 + ["step"] * 2
    rng.shuffle(moments)
    moments.insert(0, "step")  # the first run lives until its last.ckpt exists: later ones resume it
    resume: list[str] = []
    mid_write = 0
    for kill, moment in enumerate(moments, start=1):
        done = _load(ckpts / "last.ckpt")["global_step"] if (ckpts / "last.ckpt").exists() else 0
        left = {p.name for p in ckpts.glob(".melora-tmp-*")}  # by the previous kill: the run removes them
        started = time.time()
        proc = _start(cfg, *resume)
        if moment == "startup":  # the process is forked with its imports done: it starts up in about a second
            time.sleep(rng.uniform(0.05, 0.6))
        else:
            _wait_for_new_step(proc, ckpts, done + 1 + (kill == 1), started)  # it trains past where it resumed
            if moment == "write":
                deadline = time.monotonic() + 60
                while not _writing(ckpts, left) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0.0, 0.15))
        writing = _writing(ckpts, left)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL  # killed, not finished
        mid_write += writing
        if (ckpts / "last.ckpt").exists():
            last = _load(ckpts / "last.ckpt")
            same_step = _load(_step_file(reference["root"], last["global_step"]))
            diff = _max_diff(last, same_step)
            print(f"kill {kill} ({moment}{', during a write' if writing else ''}): last.ckpt at step "
                  f"{last['global_step']}, max abs diff to the reference {diff:.3g}")
            assert diff == 0.0 and _progress(last) == _progress(same_step)
            resume = ["--ckpt_path", "last"]
    proc = run_main("fit", "--config", str(cfg), *CKPT_ARGS, *resume, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _load(ckpts / "last.ckpt")
    diff = _max_diff(final, reference["last"])
    print(f"10 kills, {mid_write} during a checkpoint write; final max abs diff {diff:.3g}")
    assert mid_write >= 1
    assert final["global_step"] == TOTAL_STEPS and diff == 0.0
    assert not list(ckpts.glob(".melora-tmp-*"))
    assert not (root / "lightning_logs" / "version_1").exists()


def _writing(ckpts: Path, left: set[str]) -> bool:
    """Whether a checkpoint write of this process is in progress (its temp file exists)."""
    return any(p.name not in left for p in ckpts.glob(".melora-tmp-*"))


def _wait_for_new_step(proc: subprocess.Popen, ckpts: Path, step: int, since: float, timeout: float = 900) -> None:
    """Until this process has written the checkpoint of ``step`` (one written before ``since``,
    by an earlier process, does not count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in ckpts.glob(f"epoch=*-step={step}*.ckpt"):  # -v1: rewritten after a resume
            try:
                if path.stat().st_mtime >= since:
                    return
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.mark.slow
def test_last_checkpoint_is_the_end_of_training_even_when_the_monitor_stops_improving(setup):
    """Lightning 2.6 rewrites ``last`` only at a step where the top-k checkpoint was saved: with a
    monitor that no longer improves, ``last.ckpt`` would stay at an older step and ``--ckpt_path
    last`` would redo training. Learning rate 0: val/loss never improves after the first epoch."""
    cfg, root = _config(setup, "monitored", model_args={"learning_rate": 0.0, "head_learning_rate": 0.0})
    proc = run_main("fit", "--config", str(cfg), "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min",
                   "--checkpoint.save_top_k", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = [p.name for p in _ckpts(root).glob("epoch=*.ckpt")]
    assert best == ["epoch=0-step=6.ckpt"], best  # the monitor did not improve in epoch 1
    assert _load(_ckpts(root) / "last.ckpt")["global_step"] == TOTAL_STEPS
