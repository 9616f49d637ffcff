"""TensorBoard monitoring: the MELoRA diagnostics against dense references, and every tag of a
real tiny run (CLI, Trainer, event files read back with TensorBoard's EventAccumulator)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from melora_lit.cli import cli_main
from melora_lit.adapter.diagnostics import adapter_diagnostics, block_cosine_similarity
from melora_lit.adapter import MELoRALinear, melora_layers
from melora_lit.metrics import main_metric

from support import sentiment_rows, write_csv


def _train_csv(path: Path, n: int = 160) -> Path:
    return write_csv(path, sentiment_rows(n, seed=1))


# ----------------------------------------------------------------------------- the math
def _known_factors() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """n=4 blocks of 6 x 10 (d_out 24, d_in 40), r=3, of known ranks 2, 2, 1, 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 10, generator=g)
    b = torch.randn(4, 6, 3, generator=g)
    b[0, :, 2] = 2 * b[0, :, 0]  # collinear columns: rank 2 (exact in float32)
    b[1, :, 1] = 0  # rank 2
    b[2, :, 1:] = 0  # rank 1
    b[3] = 0  # rank 0: an all-zero block
    return a, b, [2, 2, 1, 0]


def test_diagnostics_match_dense_references():
    a, b, ranks = _known_factors()
    scaling = 0.75
    d = adapter_diagnostics(a, b, scaling)
    blocks = torch.bmm(b.double(), a.double())  # the dense blocks B_i A_i, only in this test
    dense = torch.block_diag(*blocks) * scaling
    assert d.delta_norm == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-9)
    dense_ranks = [int(torch.linalg.matrix_rank(blk.float())) for blk in blocks]
    assert dense_ranks == ranks  # the construction is right
    assert d.block_ranks == ranks and d.rank == sum(ranks) == 5 and d.max_rank == 12
    # mean cosine similarity over the pairs of non-zero blocks (0, 1, 2), by hand
    flat = blocks.reshape(4, -1)
    pairs = list(itertools.combinations(range(3), 2))
    expected = sum(float(F.cosine_similarity(flat[i], flat[j], dim=0)) for i, j in pairs) / len(pairs)
    assert d.block_cos_sim == pytest.approx(expected, abs=1e-9)
    # two identical blocks: similarity 1; opposite blocks: -1
    same_a, same_b = a[:2].clone(), b[:2].clone()
    same_a[1], same_b[1] = same_a[0], same_b[0]
    assert block_cosine_similarity(same_a, same_b) == pytest.approx(1.0, abs=1e-12)
    same_b[1] = -same_b[0]
    assert block_cosine_similarity(same_a, same_b) == pytest.approx(-1.0, abs=1e-12)


def test_diagnostics_of_a_layer_agree_with_its_delta_weight():
    torch.manual_seed(0)
    layer = MELoRALinear(nn.Linear(48, 32), r=2, n=4, alpha=8.0)
    d0 = adapter_diagnostics(layer.lora_A, layer.lora_B, layer.scaling)
    assert (d0.delta_norm, d0.rank, d0.block_cos_sim) == (0.0, 0, None)  # B = 0 at initialisation
    with torch.no_grad():
        layer.lora_B.normal_()
    d = adapter_diagnostics(layer.lora_A, layer.lora_B, layer.scaling)
    assert d.delta_norm == pytest.approx(float(torch.linalg.norm(layer.delta_weight().double())), rel=1e-6)
    assert d.rank == int(torch.linalg.matrix_rank(layer.delta_weight())) == 8
    lora = MELoRALinear(nn.Linear(48, 32), r=3, n=1)
    with torch.no_grad():
        lora.lora_B.normal_()
    d1 = adapter_diagnostics(lora.lora_A, lora.lora_B, lora.scaling)
    assert d1.block_cos_sim is None and d1.rank == 3  # n = 1: no pairs of mini LoRAs


def test_main_metric_choice():
    assert main_metric(["val/loss", "val/accuracy", "val/f1", "train/loss"]) == ("val/accuracy", "max")
    assert main_metric(["val/loss", "val/matthews"]) == ("val/matthews", "max")
    assert main_metric(["val/pearson", "val/spearman"]) == ("val/pearson", "max")
    assert main_metric(["val_matched/accuracy", "val_mismatched/accuracy"]) == ("val_matched/accuracy", "max")
    assert main_metric(["val/loss", "val/perplexity"]) == ("val/loss", "min")
    assert main_metric(["train/loss"]) is None


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_tiny_run_writes_every_tag(tmp_path, saved_bert):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": str(tmp_path), "accelerator": "cpu", "devices": 1, "max_epochs": 2,
                    "limit_train_batches": 4, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"model_name_or_path": saved_bert, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "melora": {"r": 2, "n": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}},
        "data": {"class_path": "melora_lit.data.TextClassificationDataModule",
                 "init_args": {"train_file": str(_train_csv(tmp_path / "train.csv")), "text_columns": ["review"],
                               "label_column": "sentiment", "val_size": 0.2, "batch_size": 16,
                               "max_length": 32}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(tmp_path / "config.yaml"), "--diagnostics.every_n_steps", "2",
                    "--throughput.window_size", "2", "--diagnostics.histograms", "true"])
    assert cli.trainer.global_step == 8
    run = tmp_path / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    layers = melora_layers(cli.model.model)
    assert len(layers) == 8

    expected = {"train/loss_step", "lr-AdamW", "train/grad_norm", "val/accuracy", "val/f1", "val/loss",
                "train/device/samples_per_sec", "train/device/items_per_sec", "train/device/batches_per_sec",
                "train/samples", "train/lengths", "hp_metric",
                "melora/delta_norm/mean", "melora/rank/mean", "melora/block_cos_sim/mean", "melora/rank_fraction/mean"}
    for name in layers:
        expected |= {f"melora/delta_norm/{name}", f"melora/rank/{name}", f"melora/block_cos_sim/{name}"}
    assert expected <= scalars, sorted(expected - scalars)
    assert {f"melora_hist/{name}/lora_{x}" for name in layers for x in "AB"} <= set(acc.Tags()["histograms"])

    # one gradient norm per optimizer step, positive and finite
    grad_norms = acc.Scalars("train/grad_norm")
    assert [e.step for e in grad_norms] == list(range(8))
    assert all(0 < e.value < float("inf") for e in grad_norms)
    # throughput: tokens/s counts the non-padding tokens, more than one per sample
    samples = acc.Scalars("train/device/samples_per_sec")[-1].value
    tokens = acc.Scalars("train/device/items_per_sec")[-1].value
    assert samples > 0 and tokens > 2 * samples
    assert acc.Scalars("train/samples")[-1].value == 8 * 16

    # diagnostics at the start (B = 0) and every 2 steps, matching the trained layers at the end
    name = next(iter(layers))
    assert [e.step for e in acc.Scalars(f"melora/delta_norm/{name}")] == [0, 2, 4, 6, 8]
    assert acc.Scalars(f"melora/delta_norm/{name}")[0].value == 0.0
    assert acc.Scalars(f"melora/rank/{name}")[0].value == 0.0
    for name, layer in layers.items():
        dense = layer.delta_weight()
        assert acc.Scalars(f"melora/delta_norm/{name}")[-1].value == pytest.approx(float(torch.linalg.norm(dense)),
                                                                                 rel=1e-5)
        assert acc.Scalars(f"melora/rank/{name}")[-1].value == torch.linalg.matrix_rank(dense).item() == 8
        blocks = torch.bmm(layer.lora_B.detach(), layer.lora_A.detach()).reshape(4, -1)
        cos = [float(F.cosine_similarity(blocks[i], blocks[j], dim=0)) for i, j in itertools.combinations(range(4), 2)]
        assert acc.Scalars(f"melora/block_cos_sim/{name}")[-1].value == pytest.approx(sum(cos) / 6, abs=1e-5)
    assert acc.Scalars("melora/rank_fraction/mean")[-1].value == 1.0

    # HParams view: the first hparams summary is complete and its metric is hp_metric, whose last
    # value is the best validation accuracy (no checkpoint monitor: the task's main metric)
    hparams_yaml = yaml.safe_load((run / "hparams.yaml").read_text())
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = start.hparams
    assert hp["trainable_params"].number_value == hparams_yaml["trainable_params"] > 0
    assert hp["adapter_params"].number_value == hparams_yaml["adapter_params"] == 8 * (2 * 4 * 16 + 4 * 16 * 2)
    assert hp["learning_rate"].number_value == pytest.approx(2e-2)
    assert hp["melora/n"].number_value == 4 and hp["melora/r"].number_value == 2
    assert hp["hp_metric_monitor"].string_value == "val/accuracy" and hp["hp_metric_mode"].string_value == "max"
    val = [e.value for e in acc.Scalars("val/accuracy")]
    assert len(val) == 2
    hp_metric = acc.Scalars("hp_metric")
    assert hp_metric[-1].value == pytest.approx(max(val)) and hp_metric[-1].step == 8
