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

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from melora_lit.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TOL = 1e-5

from support import csv_classification_data, sentiment_rows, write_csv, write_run_config


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
        data=csv_classification_data(train_csv, val_fraction=0.2, batch_size=32, max_length=32),
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
    """``python -m melora_lit.cli ARGS`` on 2 processes; Lightning starts the second one."""
    proc = subprocess.run(
        [sys.executable, "-m", "melora_lit.cli", *args, "--trainer.accelerator", accelerator,
         "--trainer.devices", "2", "--data.init_args.batch_size", "16"],
        cwd=ROOT, env=env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=TIMEOUT,
    )
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


def test_ddp_resumes_a_single_process_checkpoint(single, workdir):
    """Lightning's own launcher (--trainer.devices 2) resumes the reference's step-2 checkpoint:
    weights and AdamW state carry over, so steps 3-4 on 2 processes = steps 3-4 on 1."""
    root = workdir / "ddp-resume"
    run_two_processes("fit", "--config", str(single["config"]), "--config", str(ROOT / "configs/strategy/ddp.yaml"),
                      "--trainer.default_root_dir", str(root), "--ckpt_path", str(single["step2"]))
    files = checkpoint_files(root)
    assert files == [f for f in EXPECTED_FILES if "step=1" not in f and "step=2" not in f]
    assert_same_training_state(load(root / EXPECTED_FILES[-1]), load(single["last"]))


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
    assert abs(size - ref_size) < 0.05 * ref_size, (size, ref_size)  # no backbone, no shards

    cli = cli_main(["validate", "--config", str(single["config"]), "--ckpt_path", str(root / EXPECTED_FILES[-1]),
                    "--trainer.default_root_dir", str(workdir / "validate-fsdp2")])
    assert abs(float(cli.trainer.callback_metrics["val/loss"]) - single["val_loss"]) < 1e-4


def test_fsdp2_resumes_a_single_process_checkpoint(single, workdir):
    """The reverse direction: full tensors sharded back into FSDP2 DTensors, the optimizer state
    re-keyed from positions to parameter names and sharded too."""
    root = workdir / "fsdp2-resume"
    run_two_processes("fit", "--config", str(single["config"]), "--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
                      "--trainer.default_root_dir", str(root), "--ckpt_path", str(single["step2"]))
    assert_same_training_state(load(root / EXPECTED_FILES[-1]), load(single["last"]))


# ----------------------------------------------------------------------------- in-process units
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
    from melora_lit.training.strategies import optimizer_state_to_names, optimizer_state_to_positions
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
