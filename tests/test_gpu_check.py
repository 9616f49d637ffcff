"""benchmarks/gpu_check.py --smoke: the GPU check's every part, run on CPU as a real process.

The smoke run is what keeps the prepared GPU check working between the rare runs on a GPU
machine: the same code paths (real ``melora-lit fit`` runs under DDP and FSDP2, the layer and
step timers, the GLUE driver), at tiny shapes. The figures are checked for sense, not speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import TRITON_DIR

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ)
    if (TRITON_DIR / "triton").is_dir():  # the Triton candidate too, under Triton's CPU interpreter
        env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(TRITON_DIR), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "tables.md").read_text(), out


def test_every_part_ran_without_error(smoke):
    figures, tables, _ = smoke
    for part in ("tests", "strategies", "layer", "step", "glue"):
        assert part in figures and "error" not in figures[part], (part, figures.get(part))
    assert figures["smoke"] is True and figures["part_s"].keys() >= {"tests", "strategies", "layer", "step", "glue"}
    for title in ("GPU tests", "Strategies", "Layer d=", "Training step", "GLUE"):
        assert f"### {title}" in tables


def test_gpu_tests_are_collected_and_skipped_without_cuda(smoke):
    t = smoke[0]["tests"]
    assert t["exit"] == 0 and t["failed"] == 0 and t["passed"] == 0
    assert t["skipped"] >= 12  # every layer case, merge, adapter files, Lightning runs


def test_strategy_checkpoints_match_the_single_device_run_and_load_on_cpu(smoke):
    s = smoke[0]["strategies"]
    runs = s["runs"]
    assert "skipped" in runs["fsdp"]  # FSDP1: GPU only
    single = runs["single"]
    assert single["exit"] == 0 and single["adapter_only"] and single["global_step"] == 3
    for name in ("ddp", "fsdp2"):
        r = runs[name]
        assert r["exit"] == 0 and r["adapter_only"] and r["same_keys"] and r["global_step"] == single["global_step"]
        assert r["max_abs_diff"] <= 1e-5 < r["ref_max_abs"]  # trained weights, and the same ones
        assert math.isclose(r["cpu_val_loss"], single["cpu_val_loss"], rel_tol=1e-5)
    assert s["ok"] is True


def test_layer_and_step_ratios_are_plausible(smoke):
    layer, step = smoke[0]["layer"], smoke[0]["step"]
    v = layer["variants"]
    assert v["frozen floor"]["ratio"] == 1.0 and layer["rounds"] >= 3
    for name in ("MELoRA n=8 r=1", "MELoRA n=2 r=8", "per-block loop n=8 r=1", "PEFT LoRA r=8", "PEFT LoRA r=16"):
        assert 0.5 < v[name]["ratio"] < 50 and v[name]["median_ms"] > 0, name
        assert f"{name}, compiled" in v, layer.get("compile_error")
    assert set(layer["targets"]) >= {"n=8 r=1", "n=2 r=8"}
    # the profile: the adapter's own ops (its batched per-block products) appear beside the floor's GEMM
    prof = layer["profile"]
    assert set(prof) >= {"frozen floor", "MELoRA n=8 r=1"}
    names = {name: [e["name"] for e in events] for name, events in prof.items()}
    assert all(e["ms"] > 0 for events in prof.values() for e in events), prof
    assert any(op in names["MELoRA n=8 r=1"] for op in ("aten::bmm", "melora_lit::fwd_update_", "melora_lit::bwd")), names
    assert "aten::bmm" not in names["frozen floor"]
    timed = [c for c in step["configs"].values() if "skipped" not in c]
    assert timed, step["configs"]
    for c in timed:
        assert c["floor"]["ratio"] == 1.0
        assert c["floor"]["trainable"] == 0 < c["melora"]["trainable"] < c["peft"]["trainable"]
        for k in ("melora", "peft"):
            assert 0.3 < c[k]["ratio"] < 20 and c[k]["tokens_per_s"] > 0


def test_triton_candidate_is_checked_timed_and_profiled(smoke):
    """Under Triton's CPU interpreter the candidate goes through the check's own path: compared
    with the torch path on the same layer, timed beside it, profiled."""
    if not (TRITON_DIR / "triton").is_dir():
        pytest.skip(f"triton not found at {TRITON_DIR}")
    layer = smoke[0]["layer"]
    assert layer["triton_note"] == "", layer["triton_note"]
    for key in ("n=8 r=1", "n=2 r=8"):
        errors = layer["triton_vs_torch_rel_err"][key]
        assert set(errors) == {"y", "dx", "dA", "dB"} and max(errors.values()) < 1e-4, errors
        assert layer["variants"][f"MELoRA {key}, Triton"]["median_ms"] > 0
        assert f"{key}, Triton" in layer["targets"]
    assert "MELoRA n=8 r=1, Triton" in layer["profile"]


def test_glue_runs_and_report(smoke):
    g = smoke[0]["glue"]
    assert {(r["task"], r["method"]) for r in g["runs"]} == {("rte", m) for m in ("lora", "melora-n8", "melora-n2")}
    assert all(r["status"] == "done" for r in g["runs"]), g["runs"]
    assert len(g["report"]) == 3  # one report row per run
    assert all(0 <= float(r["best"]) <= 1 for r in g["report"])  # each validated: an accuracy
