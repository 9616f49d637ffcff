"""Multi-process training on CPU (gloo): DDP and FSDP2 through the real CLI, as real processes.

Every run trains the same tiny BERT (dropout 0 everywhere) on the same 32 training rows. One
step is one epoch over all 32 rows: 1 process with batch 32, or 2 processes with batch 16 each,
so every step sees the same global batch whatever the data order, and 2 processes must give
the adapter weights (and optimizer state) of 1 process up to float rounding. The DDP and FSDP2
samplers split the rows between the processes; if both processes saw the same half, the
gradient, and so the weights, would differ.

The reference is a single-process run of 4 steps that keeps every epoch's checkpoint. The
multi-process runs either train 4 steps from scratch or resume its step-2 checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning.pytorch.callbacks import Callback

from melora_lit.cli import cli_main
from melora_lit.training.checkpoints import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TOL = 1e-5

from support import (csv_classification_data, melora_popen, run_cli, save_tiny_bert, sentiment_rows, write_csv,
                     write_run_config)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


def distributed_config(path: Path, model: str, train_csv: Path, root: Path, **trainer) -> Path:
    """A task config; 40 rows = 32 train + 8 validation; one step per epoch at batch 32."""
    return write_run_config(
        path, root, seed=42,
        model={"model_name_or_path": model, "learning_rate": 2e-2, "head_learning_rate": 2e-2,
               "warmup_ratio": 0.0, "melora": {"r": 2, "n": 4, "alpha": 4, "dropout": 0.0,
                                               "target_modules": ["query", "value"]}},
        data=csv_classification_data(train_csv, val_size=0.2, batch_size=32, max_length=32),
        # small enough to clip every step: the global gradient norm must be the same with
        # gradients averaged (DDP) or sharded (FSDP2) as on one process
        trainer={"max_epochs": 4, "gradient_clip_val": 0.05, **trainer},
        extra={"checkpoint": {"save_top_k": -1}},  # every epoch's checkpoint (epoch=E-step=S.ckpt) + last.ckpt
    )


@pytest.fixture(scope="module")
def train_csv(workdir) -> Path:
    return write_csv(workdir / "train.csv", sentiment_rows(40, seed=1))


@pytest.fixture(scope="module")
def single(workdir, saved_bert_no_dropout, train_csv) -> dict:
    """The reference: one process, batch 32, 4 steps (in-process, like tests/test_training.py)."""
    root = workdir / "single"
    cfg = distributed_config(workdir / "single.yaml", saved_bert_no_dropout, train_csv, root)
    cli = cli_main(["fit", "--config", str(cfg)])
    ckpts = root / "lightning_logs" / "version_0" / "checkpoints"
    return {"config": cfg, "root": root, "step2": ckpts / "epoch=1-step=2.ckpt", "last": ckpts / "last.ckpt",
            "val_loss": float(cli.trainer.callback_metrics["val/loss"]), "model": saved_bert_no_dropout,
            "csv": train_csv}


# ----------------------------------------------------------------------------- helpers
#: The seed of the steps where the interrupted runs are stopped: MELORA_LIT_TEST_SEED=N reruns a
#: failure with the steps it had (each run prints them), other seeds try other steps.
TEST_SEED = int(os.environ.get("MELORA_LIT_TEST_SEED", "2024"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # melora-lit, torchrun
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.update(extra)
    return e


def run_two_processes(*args: str, accelerator: str = "cpu") -> subprocess.CompletedProcess:
    """``melora-lit ARGS`` on 2 processes; Lightning starts the second one."""
    proc = run_cli(*args, "--trainer.accelerator", accelerator, "--trainer.devices", "2", "--data.init_args.batch_size",
                   "16", cwd=ROOT, env=env(MASTER_PORT=str(free_port())), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    backend = "nccl" if accelerator == "gpu" else "gloo"
    assert f"distributed_backend={backend}" in proc.stdout + proc.stderr
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(ckpt: dict, ref: dict, tol: float = TOL) -> None:
    """Same step, same adapter/head weights and AdamW state (as a plain optimizer keys it)."""
    assert ckpt["global_step"] == ref["global_step"]
    assert set(ckpt["state_dict"]) == set(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        got = ckpt["state_dict"][k]
        assert type(got) is torch.Tensor and got.shape == v.shape and got.dtype == v.dtype, k
        assert torch.allclose(got, v, atol=tol, rtol=0), (k, (got - v).abs().max().item())
    opt, ref_opt = ckpt["optimizer_states"][0], ref["optimizer_states"][0]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    assert set(opt["state"]) == set(ref_opt["state"]) and len(opt["state"]) == len(ref["state_dict"])
    for i, s in ref_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt["state"][i][name], s[name], atol=tol, rtol=1e-4), (i, name)
        assert float(opt["state"][i]["step"]) == float(s["step"])
    assert ckpt["lr_schedulers"][0]["last_epoch"] == ref["lr_schedulers"][0]["last_epoch"]


def assert_adapter_only(ckpt: dict) -> None:
    keys = set(ckpt["state_dict"])
    assert sum(k.endswith(".lora_A") for k in keys) == 8  # 4 layers x (query, value)
    assert all(k.endswith((".lora_A", ".lora_B")) or k.startswith("model.classifier.") for k in keys), keys


def checkpoint_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.ckpt"))


EXPECTED_FILES = [f"lightning_logs/version_0/checkpoints/{name}" for name in
                  ("epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt", "epoch=3-step=4.ckpt",
                   "last.ckpt")]


def documented_torchrun_command() -> str:
    """The torchrun block of docs/multinode.md that the docs say this test runs."""
    text = (ROOT / "docs" / "multinode.md").read_text()
    m = re.search(r"<!-- tests/test_distributed\.py runs this block[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "docs/multinode.md lost its tested torchrun block"
    return m.group(1)


# ----------------------------------------------------------------------------- tests
def test_single_process_reference_trains(single):
    first, last = load(single["step2"]), load(single["last"])
    assert last["global_step"] == 4 and first["global_step"] == 2
    assert_adapter_only(last)
    moved = max((last["state_dict"][k] - first["state_dict"][k]).abs().max().item() for k in last["state_dict"])
    assert moved > 100 * TOL  # steps 3-4 change the weights far more than the tolerance


@pytest.mark.slow
def test_two_nodes_by_torchrun_as_documented_match_one_process_and_validate_on_one(single, workdir):
    """docs/multinode.md's torchrun command, as 2 nodes x 1 process (two separate torchruns)."""
    root = workdir / "torchrun"
    cfg = distributed_config(workdir / "torchrun.yaml", single["model"], single["csv"], root,
                             accelerator="auto")  # as a GPU node would run it; auto is cpu here
    cfg_data = yaml.safe_load(cfg.read_text())
    cfg_data["data"]["init_args"]["batch_size"] = 16  # per process: 2 x 16 = the reference's 32
    cfg.write_text(yaml.safe_dump(cfg_data))
    command = documented_torchrun_command()
    port = str(free_port())
    procs = [
        subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env(NNODES="2", PROCS_PER_NODE="1", NODE_RANK=str(rank),
                                            MASTER_PORT=port, CONFIG=str(cfg)))
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    # two nodes of one process each joined one process group
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1], outputs[0][-3000:]

    # one set of checkpoints, written once (rank 0), no per-node or per-rank copies
    assert checkpoint_files(root) == EXPECTED_FILES
    ddp_last = load(root / EXPECTED_FILES[-1])
    assert_adapter_only(ddp_last)
    assert_same_training_state(ddp_last, load(single["last"]))

    # the DDP checkpoint in a single-process validate: the reference's validation loss
    cli = cli_main(["validate", "--config", str(single["config"]), "--ckpt_path", str(root / EXPECTED_FILES[-1]),
                    "--trainer.default_root_dir", str(workdir / "validate-ddp")])
    assert cli.trainer.world_size == 1
    assert abs(float(cli.trainer.callback_metrics["val/loss"]) - single["val_loss"]) < 1e-4
    loaded = {"model." + k: v for k, v in cli.model.model.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in ddp_last["state_dict"].items())


@pytest.mark.slow
def test_ddp_resumes_a_single_process_checkpoint(single, workdir):
    """Lightning's own launcher (--trainer.devices 2) resumes the reference's step-2 checkpoint:
    weights and AdamW state carry over, so steps 3-4 on 2 processes = steps 3-4 on 1."""
    root = workdir / "ddp-resume"
    run_two_processes("fit", "--config", str(single["config"]), "--config", str(ROOT / "configs/strategy/ddp.yaml"),
                      "--trainer.default_root_dir", str(root), "--ckpt_path", str(single["step2"]))
    files = checkpoint_files(root)
    assert files == [f for f in EXPECTED_FILES if "step=1" not in f and "step=2" not in f]
    assert_same_training_state(load(root / EXPECTED_FILES[-1]), load(single["last"]))


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(single, workdir):
    """FSDP2 (ModelParallelStrategy + fully_shard per layer): the model is really sharded, the
    checkpoint is one file of full adapter tensors, equal to the single-process run's, and a
    single-process validate reads it."""
    root = workdir / "fsdp2"
    proc = run_two_processes("fit", "--config", str(single["config"]),
                             "--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
                             "--trainer.default_root_dir", str(root))
    assert "FSDP2 sharded 4 BertLayer layers, then the root, over 2 processes" in proc.stdout + proc.stderr
    assert checkpoint_files(root) == EXPECTED_FILES
    last = load(root / EXPECTED_FILES[-1])
    assert_adapter_only(last)
    assert_same_training_state(last, load(single["last"]))
    size, ref_size = (root / EXPECTED_FILES[-1]).stat().st_size, single["last"].stat().st_size
    # no backbone, no shards: only the second process's RNG states and loader position more
    second_rank = io.BytesIO()
    torch.save(last["callbacks"]["ExactResume"]["ranks"][1], second_rank)
    assert abs(size - ref_size - second_rank.tell()) < 0.05 * ref_size, (size, ref_size, second_rank.tell())

    cli = cli_main(["validate", "--config", str(single["config"]), "--ckpt_path", str(root / EXPECTED_FILES[-1]),
                    "--trainer.default_root_dir", str(workdir / "validate-fsdp2")])
    assert abs(float(cli.trainer.callback_metrics["val/loss"]) - single["val_loss"]) < 1e-4


@pytest.mark.slow
def test_fsdp2_resumes_a_single_process_checkpoint(single, workdir):
    """The reverse direction: full tensors sharded back into FSDP2 DTensors, the optimizer state
    re-keyed from positions to parameter names and sharded too."""
    root = workdir / "fsdp2-resume"
    run_two_processes("fit", "--config", str(single["config"]), "--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
                      "--trainer.default_root_dir", str(root), "--ckpt_path", str(single["step2"]))
    assert_same_training_state(load(root / EXPECTED_FILES[-1]), load(single["last"]))


# ----------------------------------------------------------------------------- exact resume
# A 2-process run killed or stopped mid-epoch and resumed with --ckpt_path last must see, on
# every rank, exactly the samples of an uninterrupted 2-process run, in the same order, and end
# with the same weights, AdamW moments and metrics, to the bit. Dropout is on everywhere (the
# backbone's and the adapter's), so each rank's RNG states matter. 32 training rows, batch 4
# per process: 4 steps per epoch, 2 epochs, a checkpoint after every step.
RESUME_EPOCH_STEPS, RESUME_STEPS = 4, 8


class SampleLog(Callback):
    """Appends each train batch a rank receives (the token ids of each sample, padding removed)
    with the global step to ``$MELORA_TEST_SAMPLE_LOG/rank<R>.jsonl``. The runs below load it
    from this file (``--trainer.callbacks+=test_distributed.SampleLog``, tests/ on PYTHONPATH)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        samples = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
        with open(Path(os.environ["MELORA_TEST_SAMPLE_LOG"]) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "samples": samples}) + "\n")


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("exact-resume")
    model = save_tiny_bert(work / "bert", dropout=True, hidden=32, layers=2)
    rows = list({r["review"]: r for r in sentiment_rows(80, seed=5)}.values())[:40]  # distinct texts
    assert len(rows) == 40
    csv = write_csv(work / "train.csv", rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    row_of = {tuple(tokenizer(r["review"], truncation=True, max_length=32)["input_ids"]): i for i, r in enumerate(rows)}
    assert len(row_of) == 40
    return {"work": work, "model": model, "csv": csv, "row_of": row_of}


def resume_config(setup: dict, name: str, num_workers: int = 0) -> tuple[Path, Path]:
    root = setup["work"] / name
    cfg = distributed_config(setup["work"] / f"{name}.yaml", setup["model"], setup["csv"], root)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"].update(max_epochs=2, gradient_clip_val=1.0)
    data["model"]["melora"]["dropout"] = 0.1
    data["data"]["init_args"].update(batch_size=4, num_workers=num_workers)
    data["checkpoint"].update(every_n_train_steps=1)
    cfg.write_text(yaml.safe_dump(data))
    return cfg, root


def start_two(cfg: Path, strategy: str, log: Path, *extra: str) -> subprocess.Popen:
    """``melora-lit fit`` on 2 processes (Lightning starts the second), in a process group of its
    own: a SIGKILL to the group is a node going away."""
    log.mkdir(exist_ok=True)
    pythonpath = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return melora_popen(
        "fit", "--config", str(cfg), "--config", str(ROOT / f"configs/strategy/{strategy}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.callbacks+=test_distributed.SampleLog",
        *extra, cwd=ROOT, env=env(MASTER_PORT=str(free_port()), MELORA_TEST_SAMPLE_LOG=str(log), PYTHONPATH=pythonpath),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, status: int = 0) -> str:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, err[-6000:]
    return err


def step_checkpoint(root: Path, step: int) -> Path | None:
    found = list((root / "lightning_logs" / "version_0" / "checkpoints").glob(f"epoch=*-step={step}.ckpt"))
    return found[0] if found else None


def wait_for_step(proc: subprocess.Popen, root: Path, step: int, since: float) -> None:
    """Until this run wrote the step's checkpoint and then last.ckpt (each whole: written to a
    temp file, renamed)."""
    deadline = time.monotonic() + TIMEOUT
    last = root / "lightning_logs/version_0/checkpoints/last.ckpt"

    def written() -> bool:
        found = step_checkpoint(root, step)
        return (found is not None and found.stat().st_mtime >= since and last.exists()
                and last.stat().st_mtime >= found.stat().st_mtime)

    while not written():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no checkpoint of step {step}")
        time.sleep(0.005)


def rank_one(proc: subprocess.Popen) -> int:
    """The pid of rank 1: the child Lightning started with LOCAL_RANK=1 (not a loader worker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == proc.pid and b"LOCAL_RANK=1\0" in (stat.parent / "environ").read_bytes():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError("rank 1 not found")


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the weights and the AdamW moments of two checkpoints."""
    assert set(a["state_dict"]) == set(b["state_dict"]) and a["global_step"] == b["global_step"]
    diffs = [(a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert set(sa) == set(sb) and len(sa) == len(a["state_dict"])
    diffs += [(sa[i][m] - sb[i][m]).abs().max().item() for i in sa for m in ("exp_avg", "exp_avg_sq")]
    return max(diffs)


def samples_by_rank(setup: dict, log: Path) -> dict[int, list[tuple[int, list[int]]]]:
    """rank -> [(global step, CSV row of each sample)], in the order the rank trained on them."""
    out = {}
    for rank in (0, 1):
        lines = (log / f"rank{rank}.jsonl").read_text().splitlines()
        out[rank] = [(e["step"], [setup["row_of"][tuple(s)] for s in e["samples"]]) for e in map(json.loads, lines)]
    return out


def logged_train_loss(root: Path) -> dict[int, float]:
    """train/loss of each step as TensorBoard holds it (a step logged twice, before a stop and
    after the resume, must have one value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, set[float]] = {}
    for events in sorted((root / "lightning_logs" / "version_0").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss_step" not in acc.Tags()["scalars"]:
            continue  # a run killed before its first flush left an event file without it
        for e in acc.Scalars("train/loss_step"):
            values.setdefault(e.step, set()).add(e.value)
    assert all(len(v) == 1 for v in values.values()), values
    return {step: v.pop() for step, v in values.items()}


def final_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("melora-lit: after "))


def uninterrupted(setup: dict, strategy: str) -> dict:
    cfg, root = resume_config(setup, f"{strategy}-uninterrupted")
    log = setup["work"] / f"{strategy}-uninterrupted-samples"
    err = finish(start_two(cfg, strategy, log))
    samples = samples_by_rank(setup, log)
    # the reference itself: each epoch deals every training row exactly once over the 2 ranks
    train_rows = None
    for epoch in range(2):
        seen = [row for rank in (0, 1) for step, rows in samples[rank]
                if step // RESUME_EPOCH_STEPS == epoch for row in rows]
        assert len(seen) == 32 and len(set(seen)) == 32, seen
        assert train_rows is None or set(seen) == train_rows
        train_rows = set(seen)
    assert [s for s, _ in samples[0]] == list(range(RESUME_STEPS))
    return {"root": root, "samples": samples, "final": final_line(err), "loss": logged_train_loss(root),
            "last": load(root / "lightning_logs/version_0/checkpoints/last.ckpt")}


@pytest.fixture(scope="module")
def ddp_uninterrupted(resume_setup) -> dict:
    return uninterrupted(resume_setup, "ddp")


def interrupt_and_resume(setup: dict, strategy: str, reference: dict, name: str, stops: list[tuple[str, int]],
                         num_workers: int = 0) -> None:
    """Run, stop at each (how, step) in turn and resume with --ckpt_path last; then compare."""
    print(f"stops {stops} (MELORA_LIT_TEST_SEED={TEST_SEED})")
    cfg, root = resume_config(setup, name, num_workers)
    log = setup["work"] / f"{name}-samples"
    resume: list[str] = []
    for how, step in stops:
        since = time.time()
        proc = start_two(cfg, strategy, log, *resume)
        wait_for_step(proc, root, step, since)
        if how == "SIGKILL":  # the whole node: every rank and loader worker
            os.killpg(proc.pid, signal.SIGKILL)
            finish(proc, -signal.SIGKILL)
        else:  # a scheduler's SIGTERM to one rank (rank 1): all ranks save, then exit 3
            os.kill(rank_one(proc), signal.SIGTERM)
            err = finish(proc, EXIT_PREEMPTED)
            assert "received SIGTERM: stopped after step" in err and "Traceback" not in err, err[-3000:]
        last = load(root / "lightning_logs/version_0/checkpoints/last.ckpt")
        saved = last["global_step"]
        diff = max_abs_diff(last, load(step_checkpoint(reference["root"], saved)))
        print(f"{strategy} {how} at step {step}: last.ckpt at step {saved} (epoch {saved // RESUME_EPOCH_STEPS}, "
              f"batch {saved % RESUME_EPOCH_STEPS} of {RESUME_EPOCH_STEPS}); max abs diff to the uninterrupted run "
              f"at that step {diff:.3g}")
        assert diff == 0.0 and saved % RESUME_EPOCH_STEPS != 0  # stopped mid-epoch
        resume = ["--ckpt_path", "last"]
    err = finish(start_two(cfg, strategy, log, *resume))
    assert "resuming from" in err

    samples, final = samples_by_rank(setup, log), load(root / "lightning_logs/version_0/checkpoints/last.ckpt")
    compared = 0
    for rank in (0, 1):
        expected = dict(reference["samples"][rank])
        # every batch a rank trained on, before and after each stop (a step killed before its
        # checkpoint is trained twice: both times on the same samples)
        assert all(rows == expected[step] for step, rows in samples[rank]), rank
        assert [rows for _, rows in dict(samples[rank]).items()] == [expected[s] for s in range(RESUME_STEPS)]
        compared += sum(len(rows) for rows in expected.values())
    diff = max_abs_diff(final, reference["last"])
    print(f"{strategy}: {compared} samples compared over 2 ranks x {RESUME_STEPS} steps, all equal; final max abs diff "
          f"(adapter, head, AdamW moments) {diff!r}; {final_line(err)}")
    assert diff == 0.0 and final_line(err) == reference["final"]
    # the train loss of each step as logged (TensorBoard events not yet flushed when a SIGKILL
    # comes are lost; the last resumed run logged all of its own)
    logged = logged_train_loss(root)
    assert all(value == reference["loss"][step] for step, value in logged.items())
    assert set(range(saved, RESUME_STEPS)) <= set(logged)
    assert not (root / "lightning_logs" / "version_1").exists()  # one run folder throughout


@pytest.mark.slow
def test_ddp_killed_and_preempted_mid_epoch_resumes_exactly(resume_setup, ddp_uninterrupted):
    """SIGKILL to every process at a random mid-epoch step, resume; then SIGTERM to rank 1 in the
    next epoch, resume; with 2 loader workers per rank (the reference has none)."""
    rng = random.Random(TEST_SEED)  # steps 1-2 and 5-6: mid-epoch even if the stop lands a step later
    kill, term = rng.randint(1, 2), rng.randint(5, 6)
    interrupt_and_resume(resume_setup, "ddp", ddp_uninterrupted, "ddp-interrupted",
                         [("SIGKILL", kill), ("SIGTERM", term)], num_workers=2)


@pytest.mark.slow
def test_fsdp2_killed_mid_epoch_resumes_exactly(resume_setup):
    reference = uninterrupted(resume_setup, "fsdp2")
    step = random.Random(TEST_SEED + 1).choice([1, 2, 5, 6])
    interrupt_and_resume(resume_setup, "fsdp2", reference, "fsdp2-interrupted", [("SIGKILL", step)])


@pytest.mark.slow
def test_another_number_of_processes_is_refused_mid_epoch_and_exact_at_an_epoch_end(resume_setup, ddp_uninterrupted):
    """A 2-process checkpoint resumed by 1 process. Mid-epoch: refused in one line, before
    anything is written (the run folder byte-identical). From the end of epoch 0 with the same
    global batch (1 x 8 = 2 x 4): epoch 1 trains every row exactly once. With another number of
    batches per epoch (1 x 4), Lightning would cut the next epoch short: refused."""
    from melora_lit.loading import check_same_data_order

    cfg, root = resume_config(resume_setup, "one-process")
    ref_root = ddp_uninterrupted["root"]
    before = {p: p.read_bytes() for p in ref_root.rglob("*") if p.is_file()}
    mid = step_checkpoint(ref_root, 2)
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", str(mid), cwd=ROOT, env=env(), timeout=TIMEOUT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    print(f"2 -> 1 process from {mid.name}: exit {proc.returncode}: {lines}")
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "saved mid-epoch (epoch 0, 8 of 16 samples per process) by 2 processes and this run has 1" in lines[0]
    assert "resume with 2" in lines[0] and "end of an epoch" in lines[0]
    assert {p: p.read_bytes() for p in ref_root.rglob("*") if p.is_file()} == before
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]  # nothing started

    end = step_checkpoint(ref_root, RESUME_EPOCH_STEPS)  # saved after the last batch of epoch 0
    position = load(end)["callbacks"]["ExactResume"]["ranks"][0]["train_loader"]["sampler"]
    assert position["yielded"] == position["num_samples"] == 16 and position["num_replicas"] == 2
    check_same_data_order(position, 42, 1, epoch=1, epoch_batches=RESUME_EPOCH_STEPS)  # 1 x 8: accepted
    with pytest.raises(ValueError, match="end of an epoch of 4 batches per process .* this run's epochs have 8"):
        check_same_data_order(position, 42, 1, epoch=1, epoch_batches=8)  # 1 x 4

    log = resume_setup["work"] / "one-process-samples"
    log.mkdir()
    pythonpath = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = run_cli("fit", "--config", str(cfg), "--ckpt_path", str(end), "--data.init_args.batch_size", "8",
                   "--trainer.callbacks+=test_distributed.SampleLog", cwd=ROOT,
                   env=env(MELORA_TEST_SAMPLE_LOG=str(log), PYTHONPATH=pythonpath), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [json.loads(line) for line in (log / "rank0.jsonl").read_text().splitlines()]
    rows = [resume_setup["row_of"][tuple(s)] for e in entries for s in e["samples"]]
    epoch0 = {r for rank in (0, 1) for step, rs in ddp_uninterrupted["samples"][rank] if step < 4 for r in rs}
    print(f"2 -> 1 process (batch 8) from {end.name}: epoch 1 trained {len(rows)} samples, {len(set(rows))} "
          f"distinct, steps {entries[0]['step']}..{entries[-1]['step']}")
    assert [e["step"] for e in entries] == list(range(RESUME_EPOCH_STEPS, RESUME_STEPS))
    assert sorted(rows) == sorted(epoch0)  # every training row exactly once


# ----------------------------------------------------------------------------- in-process units
@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_deals_and_resumes_its_share_of_the_epoch_order(num_workers):
    """Two ranks' train loaders (num_replicas=2 given, so no process group is needed) deal the
    epoch's order as torch's DistributedSampler deals (27 rows padded to 2 x 14, every other
    index each); each rank stopped after 2 batches (its workers drawing ahead) and resumed from
    its state continues with exactly its remaining indices. The same for the length-grouped
    order of instruction data."""
    from melora_lit.data.instruction import LengthGroupedSampler
    from melora_lit.loading import ResumableDataLoader, ResumableRandomSampler

    data = list(range(27))

    def loader(rank: int, grouped: bool, workers: int = num_workers) -> ResumableDataLoader:
        sampler = (LengthGroupedSampler([(i * 7) % 13 for i in data], 4, seed=3, mega_batch_mult=2,
                                        num_replicas=2, rank=rank)
                   if grouped else ResumableRandomSampler(data, seed=3, num_replicas=2, rank=rank))
        sampler.set_epoch(1)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)

    for grouped in (False, True):
        order = (loader(0, True).sampler.epoch_order() if grouped
                 else torch.randperm(27, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist())
        padded = order + order[:1]
        full = {rank: [int(i) for batch in loader(rank, grouped) for i in batch] for rank in (0, 1)}
        assert full == {0: padded[0::2], 1: padded[1::2]}, grouped
        for rank in (0, 1):
            first = loader(rank, grouped)
            it = iter(first)
            seen = [int(i) for _ in range(2) for i in next(it)]
            state = first.state_dict()
            del it
            assert state["sampler"] == {"epoch": 1, "yielded": 8, "seed": 3, "num_replicas": 2, "num_samples": 14,
                                        "batch_size": 4, "num_workers": num_workers}
            for workers in (num_workers, 2 - num_workers):  # torchdata's state; the position alone
                resumed = loader(rank, grouped, workers)
                resumed.load_state_dict(state)
                assert seen + [int(i) for batch in resumed for i in batch] == full[rank], (grouped, rank, workers)


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))


def test_transformer_layer_classes_come_from_no_split_modules():
    from melora_lit.training.strategies import transformer_layer_classes
    from transformers.models.bert.modeling_bert import BertLayer

    model = _bert_classifier()
    assert {"BertLayer", "BertEmbeddings"} <= set(model._no_split_modules)
    # BertEmbeddings is never split either, but only the repeated layers are FSDP units
    assert transformer_layer_classes(model) == {BertLayer}
    assert [n for n, m in model.named_modules() if isinstance(m, BertLayer)] == ["bert.encoder.layer.0",
                                                                                  "bert.encoder.layer.1"]
    with pytest.raises(ValueError, match="_no_split_modules"):
        transformer_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fsdp1_policies_are_computed_from_the_model():
    from lightning.pytorch.strategies import ModelParallelStrategy
    from melora_lit.training.strategies import FSDP2Strategy, FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    strategy = FSDPStrategy(activation_checkpointing=True)
    assert strategy.kwargs["use_orig_params"] is True
    strategy.set_layer_policies(_bert_classifier())
    for policy in (strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]):
        assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {BertLayer}
    assert "auto_wrap_policy" not in FSDPStrategy(auto_wrap=False).kwargs

    assert isinstance(FSDP2Strategy(), ModelParallelStrategy)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        FSDP2Strategy(tensor_parallel_size=2)


def test_optimizer_state_positions_and_names_round_trip():
    """Positions are those of a plain optimizer over the trainable parameters only (Lightning's
    FSDP strategies count frozen parameters too, which a plain optimizer misreads)."""
    from melora_lit.training.sharded_state import optimizer_state_to_names, optimizer_state_to_positions
    from melora_lit.adapter import MELoRAConfig, inject_melora

    model = _bert_classifier()
    inject_melora(model, MELoRAConfig(r=2, n=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in trainable if "lora" in n], "lr": 1e-3},
                             {"params": [p for n, p in trainable if "lora" not in n], "lr": 1e-2}])
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
    opt.step()
    plain = opt.state_dict()
    named = optimizer_state_to_names(plain, model, opt)
    assert list(named["state"])[0] == trainable[0][0] and named["param_groups"][1]["params"][0] == "classifier.weight"
    back = optimizer_state_to_positions(named, model, opt)
    assert back["param_groups"] == plain["param_groups"]
    assert all(torch.equal(back["state"][i]["exp_avg"], s["exp_avg"]) for i, s in plain["state"].items())
    with pytest.raises(ValueError, match="does not fit"):
        optimizer_state_to_names({**plain, "param_groups": plain["param_groups"][:1]}, model, opt)


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line():
    from melora_lit.training.checkpoints import check_state_shapes

    expected = {"model.a.lora_A": (4, 2, 16), "model.classifier.weight": (2, 64)}
    good = {"model.a.lora_A": torch.zeros(4, 2, 16), "model.classifier.weight": torch.zeros(2, 64)}
    check_state_shapes(good, expected)
    for state, words in (({**good, "model.a.lora_A": torch.zeros(2, 2, 32)}, "expected shape (4, 2, 16)"),
                         ({"model.classifier.weight": torch.zeros(2, 64)}, "missing key 'model.a.lora_A'"),
                         ({**good, "model.b.lora_B": torch.zeros(1)}, "unexpected key 'model.b.lora_B'")):
        with pytest.raises(ValueError) as err:
            check_state_shapes(state, expected)
        assert "\n" not in str(err.value) and "does not fit" in str(err.value) and words in str(err.value)


# ----------------------------------------------------------------------------- GPU only
# Not run on CPU-only machines (CI here): nccl, and FSDP1, which torch runs on accelerators only.
# On a machine with 2 CUDA GPUs: python -m pytest tests/test_distributed.py -k gpu
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs (nccl, FSDP1)")


@pytest.fixture(scope="module")
def single_gpu(workdir, saved_bert_no_dropout, train_csv) -> dict:
    """The reference on 1 GPU; no gradient clipping (Lightning's FSDP1 refuses clipping by norm)."""
    root = workdir / "single-gpu"
    cfg = distributed_config(workdir / "single-gpu.yaml", saved_bert_no_dropout, train_csv, root,
                             accelerator="gpu", gradient_clip_val=None)
    cli_main(["fit", "--config", str(cfg)])
    ckpts = root / "lightning_logs" / "version_0" / "checkpoints"
    return {"config": cfg, "step2": ckpts / "epoch=1-step=2.ckpt", "last": ckpts / "last.ckpt"}


@needs_2_gpus
@pytest.mark.parametrize("resume", [False, True], ids=["scratch", "resume"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp"])
def test_gpu_two_processes_match_one_gpu(single_gpu, workdir, strategy, resume):
    root = workdir / f"gpu-{strategy}-{'resume' if resume else 'scratch'}"
    args = ["fit", "--config", str(single_gpu["config"]), "--config", str(ROOT / f"configs/strategy/{strategy}.yaml"),
            "--trainer.default_root_dir", str(root)]
    if resume:
        args += ["--ckpt_path", str(single_gpu["step2"])]
    run_two_processes(*args, accelerator="gpu")
    last = load(root / EXPECTED_FILES[-1])
    assert_adapter_only(last)
    assert_same_training_state(last, load(single_gpu["last"]))
