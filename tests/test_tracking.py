"""Any Lightning logger as the run's logger: W&B (offline) and MLflow (a local file store) get
the run's metrics, and the run keeps its folder all the same (``config.yaml``, checkpoints,
``metrics.csv``): ``--ckpt_path last`` resumes it and ``report`` reads it."""

from __future__ import annotations

import csv

import pytest
import torch

from support import run_main, save_tiny_bert, sentiment_rows, write_config, write_csv

TRACKERS = {
    "wandb": ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true",
              "--trainer.logger.project", "melora"],
    "mlflow": ["--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger", "--trainer.logger.experiment_name",
               "melora"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tracking")
    return {"model": save_tiny_bert(root / "bert"), "train": write_csv(root / "train.csv", sentiment_rows(64, 4))}


@pytest.mark.parametrize("tracker", sorted(TRACKERS))
def test_a_tracking_logger_gets_the_metrics_and_the_run_keeps_its_folder(data, tmp_path, monkeypatch, tracker):
    pytest.importorskip(tracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store as an opt-in
    root = tmp_path / "runs"
    cfg = write_config(tmp_path / "cfg.yaml", data["model"], data["train"], root, trainer={"max_epochs": 1})
    args = ["--config", str(cfg), *TRACKERS[tracker]]
    args += (["--trainer.logger.save_dir", str(tmp_path / "wandb")] if tracker == "wandb"
             else ["--trainer.logger.tracking_uri", f"file:{tmp_path / 'mlruns'}"])

    out = run_main("fit", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "lightning_logs" / "version_0"
    assert {"config.yaml", "hparams.yaml", "metrics.csv"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "metrics.csv") as f:
        steps = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert len(steps) == 6
    if tracker == "wandb":  # the offline run's own file, for `wandb sync`
        assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    else:  # MLflow's file store: one line per logged step
        (losses,) = list((tmp_path / "mlruns").glob("*/*/metrics/train/loss_step"))
        assert len(losses.read_text().splitlines()) == 6

    resumed = run_main("fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in resumed.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12  # in its own folder
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]

    report = run_main("report", str(run), "--output", str(tmp_path / "rep"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "version_0" in (tmp_path / "rep" / "report.md").read_text()
