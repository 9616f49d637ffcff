"""``--model.init_adapter``: a fit that starts from an exported adapter (melora_lit's own format
or PEFT's) holds exactly that adapter before its first step, with a fresh optimizer; an adapter of
other shapes is refused in one line and the refused run leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from melora_lit.export import export_checkpoint

from support import run_main, save_tiny_bert, sentiment_rows, tree_hashes, write_config, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("warm")
    model = save_tiny_bert(root / "bert", dropout=False)
    train = write_csv(root / "train.csv", sentiment_rows(64, 3))
    cfg = write_config(root / "cfg.yaml", model, train, root / "runs", trainer={"max_epochs": 1})
    out = run_main("fit", "--config", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = next((root / "runs").rglob("last.ckpt"))
    exports = export_checkpoint(str(ckpt), str(root / "export"), "all")
    return {"root": root, "model": model, "train": train, "ckpt": ckpt, "exports": exports}


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("kind", ["adapter", "peft"])
def test_a_fit_starts_from_an_exported_adapter_with_a_fresh_optimizer(trained, tmp_path, kind):
    # learning rate 0, no weight decay: after one step the weights are still the ones it started from
    cfg = write_config(tmp_path / "cfg.yaml", trained["model"], trained["train"], tmp_path / "runs",
                       trainer={"max_steps": 1, "limit_val_batches": 0},
                       model_args={"learning_rate": 0.0, "head_learning_rate": 0.0, "weight_decay": 0.0,
                                   "warmup_ratio": 0.0, "init_adapter": str(trained["exports"][kind])})
    out = run_main("fit", "--config", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"started from the {'melora' if kind == 'adapter' else 'peft'} adapter" in out.stderr
    started = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    source = _adapter(trained["ckpt"])
    assert started["state_dict"].keys() == source.keys()
    for key, value in source.items():
        torch.testing.assert_close(started["state_dict"][key], value, rtol=1e-6, atol=0)
    assert started["global_step"] == 1
    moments = started["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 1 for s in moments.values())  # the optimizer started with this run


@pytest.mark.parametrize("kind", ["adapter", "peft"])
def test_an_adapter_of_other_shapes_is_refused_in_one_line_and_nothing_is_left(trained, tmp_path, kind):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "keep.txt").write_text("earlier file")
    before = tree_hashes(root)
    cfg = write_config(tmp_path / "cfg.yaml", trained["model"], trained["train"], root,
                       model_args={"init_adapter": str(trained["exports"][kind]),
                                   "melora": {"r": 2, "n": 4, "alpha": 4, "dropout": 0.0,
                                              "target_modules": ["query", "value"]}})
    out = run_main("fit", "--config", str(cfg))
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("melora-lit: error: model.init_adapter=") and str(trained["exports"][kind]) in line
    assert tree_hashes(root) == before
