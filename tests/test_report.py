"""``melora-lit report`` from real tiny runs (CLI fits of a tiny BERT), read back from their event
files, config.yaml and hparams.yaml."""

from __future__ import annotations

import csv
import statistics
import struct
import sys
from pathlib import Path

import pytest
import yaml

from melora_lit.cli import cli_main, main
from melora_lit.report import build_report

from support import save_tiny_bert, sentiment_rows, write_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three fits (MELoRA n=4 r=2 with seeds 1 and 2, LoRA n=1 r=4 with seed 1) and one validate
    run, all in one lightning_logs folder; returns the root, the runs' folders and models."""
    root = tmp_path_factory.mktemp("report-runs")
    model = save_tiny_bert(root / "tiny-bert", layers=2)
    train = write_csv(root / "train.csv", sentiment_rows(96, seed=1))
    logs = root / "logs"
    done = []
    for seed, n, r in ((1, 4, 2), (2, 4, 2), (1, 1, 4)):
        cfg = {
            "seed_everything": seed,
            "trainer": {"default_root_dir": str(logs), "accelerator": "cpu", "devices": 1, "max_epochs": 2,
                        "limit_train_batches": 3, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "enable_model_summary": False, "num_sanity_val_steps": 0},
            "model": {"model_name_or_path": str(model), "learning_rate": 2e-2, "warmup_ratio": 0.0,
                      "melora": {"r": r, "n": n, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}},
            "data": {"class_path": "melora_lit.data.TextClassificationDataModule",
                     "init_args": {"train_file": str(train), "text_columns": ["review"], "label_column": "sentiment",
                                   "val_size": 0.25, "batch_size": 16, "max_length": 32}},
            "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
        }
        path = root / f"config-{seed}-{n}-{r}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = cli_main(["fit", "--config", str(path)])
        trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
        done.append({"dir": Path(cli.trainer.log_dir), "seed": seed, "n": n, "r": r, "trainable": trainable})
    # a validate run logs into its own version folder, without any train/ scalar
    first = done[0]["dir"]
    cli_main(["validate", "--config", str(first / "config.yaml"), "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    return {"root": root, "logs": logs, "runs": done}


def _best(run: Path) -> tuple[float, int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    val = [(e.step, e.value) for e in acc.Scalars("val/accuracy")]
    best = max(v for _, v in val)
    step = next(s for s, v in val if v == best)
    epoch = next(int(e.value) for e in acc.Scalars("epoch") if e.step == step)
    return best, epoch


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_report_of_real_runs(runs, tmp_path):
    out = tmp_path / "report"
    paths = cli_main(["report", str(runs["logs"]), "--output", str(out)])  # the folder of all runs
    assert set(paths) == {"markdown", "csv", "plot"}
    markdown = paths["markdown"].read_text()
    rows = _table_rows(markdown, "| run |")
    assert len(rows) == 3  # the validate run is left out, and said so
    assert "Left out" in markdown and "version_3" in markdown.split("Left out")[1]
    by_run = {row[0]: row for row in rows}
    for run in runs["runs"]:
        row = by_run[f"lightning_logs/version_{run['dir'].name.split('_')[1]}"]
        hparams = yaml.safe_load((run["dir"] / "hparams.yaml").read_text())
        assert hparams["trainable_params"] == run["trainable"]
        best, epoch = _best(run["dir"])
        method = "LoRA" if run["n"] == 1 else "MELoRA"
        assert row[1:10] == ["TextClassificationDataModule", method, str(run["n"]), str(run["r"]),
                             str(run["n"] * run["r"]), f"{hparams['trainable_params']:,}",
                             f"{hparams['adapter_params']:,}", str(run["seed"]), "val/accuracy"]
        assert row[10] == f"{best:.4f}" and row[11] == str(epoch)
        assert row[12].endswith("s") and row[12] != "—"
    # LoRA r=4 and MELoRA n=4, r=2 on the 4 adapted layers (2 x query, value of 64 x 64)
    lora = yaml.safe_load((runs["runs"][2]["dir"] / "hparams.yaml").read_text())
    melora = yaml.safe_load((runs["runs"][0]["dir"] / "hparams.yaml").read_text())
    assert lora["adapter_params"] == 4 * (4 * 64 + 64 * 4)
    assert melora["adapter_params"] == 4 * (4 * 2 * 16 + 4 * 16 * 2)

    # the two seeds of MELoRA n=4 r=2 are aggregated; LoRA is a group of one
    agg = _table_rows(markdown, "| task |")
    assert len(agg) == 2
    row = next(r for r in agg if r[1] == "MELoRA")
    bests = [_best(run["dir"])[0] for run in runs["runs"][:2]]
    assert row[7:10] == ["2", "1, 2", f"{statistics.mean(bests):.4f} ± {statistics.stdev(bests):.4f}"]
    assert row[5] == f"{melora['trainable_params']:,}"

    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 3
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100 and len(png) > 5000


def test_report_of_one_version_folder_as_a_function(runs, tmp_path):
    run = runs["runs"][2]["dir"]
    paths = build_report([run], tmp_path / "one")
    markdown = paths["markdown"].read_text()
    assert len(_table_rows(markdown, "| run |")) == 1 and "Mean ± std" not in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_report_of_no_runs_is_one_line_exit_2(tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "nothing"
    if kind == "empty":
        (target / "sub").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["melora-lit", "report", str(target), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("melora-lit: error: ")
    assert ("run folder not found" if kind == "missing" else "no runs in") in err
    assert not (tmp_path / "out").exists()
