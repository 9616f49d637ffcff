"""Forward+backward time of one adapted layer: MELoRA (with its fused CPU kernels and on the
plain-torch path) vs. the frozen floor, the paper's per-block loop, a batched einsum and PEFT
LoRA, without and with dropout; plus torch.compile on varying shapes.

    python benchmarks/bench_layer.py                       # d=768 and 4096, 4096 tokens, CPU fp32
    python benchmarks/bench_layer.py --dims 768 --reps 21
    python benchmarks/bench_layer.py --device cuda          # bf16
    python benchmarks/bench_layer.py --dims 768 --dtype bfloat16 --no-compile   # bf16 on CPU

All variants of one size are timed side by side: every round runs each of them once, in a
rotated order. The ratio to the floor is the median over rounds of (variant / floor in the
same round), which cancels the drift of a shared machine; the median times and the ratio of
the minima are printed too. The input requires grad (as inside a network), so every
variant, the floor included, computes the input gradient.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import re
import statistics
import sys
import time
import warnings

import torch
from torch import nn

from melora_lit import MELoRALinear
from melora_lit.adapter import cpu_kernels

CONFIGS = [(8, 1), (16, 1), (32, 1), (2, 8)]  # (n, r)
ALPHA = 16.0
DROPOUT = 0.05  # MELoRAConfig's default


# --------------------------------------------------------------------------- reference variants


class LoopMELoRA(nn.Module):
    """As the paper's code: n separate A_i / B_i nn.Linear on the input slices, concatenated."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float = ALPHA):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.k, o = base.in_features // n, base.out_features // n
        w = base.weight
        self.A = nn.ModuleList(nn.Linear(self.k, r, bias=False, device=w.device, dtype=w.dtype) for _ in range(n))
        self.B = nn.ModuleList(nn.Linear(r, o, bias=False, device=w.device, dtype=w.dtype) for _ in range(n))
        self.scaling = alpha / r

    def forward(self, x):
        xs = x.split(self.k, dim=-1)
        delta = torch.cat([b(a(xi)) for a, b, xi in zip(self.A, self.B, xs)], dim=-1)
        return self.base(x) + delta * self.scaling


class EinsumMELoRA(nn.Module):
    """The plain batched version: einsum over (…, n, d_in/n) with stacked A and B; autograd backward."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float = ALPHA):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.n, self.k, self.d_out = n, base.in_features // n, base.out_features
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(n, r, self.k, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(n, self.d_out // n, r, device=w.device, dtype=w.dtype) * 0.02)
        self.scaling = alpha / r

    def forward(self, x):
        xs = x.view(*x.shape[:-1], self.n, self.k)
        h = torch.einsum("...nk,nrk->...nr", xs, self.lora_A)
        delta = torch.einsum("...nr,nor->...no", h, self.lora_B).reshape(*x.shape[:-1], self.d_out)
        return self.base(x) + delta * self.scaling


class _One(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


class TorchPath(nn.Module):
    """A MELoRALinear run on its plain-torch path (the CPU kernels switched off)."""

    def __init__(self, layer: MELoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with cpu_kernels.disabled():
            return self.layer(x)


def peft_lora(base: nn.Linear, rank: int, dropout: float = 0.0):
    """PEFT's own lora.Linear around a copy of ``base``, via LoraConfig/get_peft_model."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_One(base), LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def melora(base: nn.Linear, n: int, r: int, cls=MELoRALinear, dropout: float = 0.0) -> MELoRALinear:
    layer = cls(base, r=r, n=n, alpha=ALPHA, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)  # non-zero, as after training
    return layer


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    mod(x).backward(g)
    x.grad = None
    for p in mod.parameters():
        p.grad = None


def time_side_by_side(variants: dict[str, nn.Module], x, g, reps: int, device: str) -> dict[str, list[float]]:
    """Per variant, the list of forward+backward times in ms, one per round."""
    names = list(variants)
    for name in names:  # warm-up round (allocator, kernels, lazy init)
        step(variants[name], x, g)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            sync(device)
            t0 = time.perf_counter()
            step(variants[name], x, g)
            sync(device)
            samples[name].append(1e3 * (time.perf_counter() - t0))
    return samples


def profile_ops(mod: nn.Module, x, g, device: str, steps: int = 5, top: int = 10, warmup: int = 2) -> list[dict]:
    """Where one forward+backward's time goes: torch.profiler's ops and kernels, by self time
    on the device (CUDA kernels) or on the CPU, per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step(mod, x, g)
    sync(device)
    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step(mod, x, g)
        sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: -getattr(e, attr))
    return [{"name": e.key, "ms": getattr(e, attr) / 1e3 / steps, "calls": e.count / steps} for e in events[:top]]


def paired_ratio(times: list[float], floor: list[float]) -> float:
    """Median over rounds of (time / floor time in the same round)."""
    return statistics.median([a / b for a, b in zip(times, floor)])


def load_baseline(path: str):
    """The MELoRALinear class of another adapter/layer.py (e.g. an older revision of the core)."""
    # a module of melora_lit.adapter, so that its relative imports (``from . import cpu_kernels``) resolve
    spec = importlib.util.spec_from_file_location("melora_lit.adapter._baseline_layer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MELoRALinear


def build_variants(d: int, device: str, dtype: torch.dtype, baseline=None) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    v: dict[str, nn.Module] = {"frozen nn.Linear (floor)": base}
    for n, r in CONFIGS:
        v[f"MELoRALinear n={n} r={r}"] = melora(copy.deepcopy(base), n, r)
    if kernels_on(device, dtype):
        for n, r in CONFIGS:
            v[f"MELoRALinear n={n} r={r}, torch path"] = TorchPath(melora(copy.deepcopy(base), n, r))
    if baseline is not None:
        for n, r in CONFIGS:
            v[f"baseline MELoRALinear n={n} r={r}"] = melora(copy.deepcopy(base), n, r, cls=baseline)
    for n, r in CONFIGS:
        v[f"per-block loop n={n} r={r}"] = LoopMELoRA(copy.deepcopy(base), n, r)
    for n, r in CONFIGS:
        v[f"batched einsum n={n} r={r}"] = EinsumMELoRA(copy.deepcopy(base), n, r)
    try:
        for rank in sorted({r for _, r in CONFIGS} | {n * r for n, r in CONFIGS}):
            v[f"PEFT LoRA rank {rank}"] = peft_lora(copy.deepcopy(base), rank)
    except ImportError as e:
        print(f"(PEFT not installed, skipped: {e})")
    # with dropout (train mode): the adapter sees dropout(x), the base sees x
    n, r = CONFIGS[0]
    v[f"MELoRALinear n={n} r={r}, dropout {DROPOUT}"] = melora(copy.deepcopy(base), n, r, dropout=DROPOUT)
    if kernels_on(device, dtype):
        v[f"MELoRALinear n={n} r={r}, dropout {DROPOUT}, torch path"] = TorchPath(
            melora(copy.deepcopy(base), n, r, dropout=DROPOUT))
    try:
        v[f"PEFT LoRA rank {n * r}, dropout {DROPOUT}"] = peft_lora(copy.deepcopy(base), n * r, DROPOUT)
    except ImportError:
        pass
    for m in v.values():
        m.train()
    return v


def kernels_on(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()


@torch.no_grad()
def check_agreement(d: int, device: str, dtype: torch.dtype) -> float:
    """Max abs difference between MELoRALinear, the loop and the einsum holding the same A, B."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    n, r = CONFIGS[0]
    m, lp, es = melora(copy.deepcopy(base), n, r), LoopMELoRA(copy.deepcopy(base), n, r), EinsumMELoRA(base, n, r)
    es.lora_A.copy_(m.lora_A)
    es.lora_B.copy_(m.lora_B)
    for i in range(n):
        lp.A[i].weight.copy_(m.lora_A[i])
        lp.B[i].weight.copy_(m.lora_B[i])
    x = torch.randn(64, d, device=device, dtype=dtype)
    y = m(x)
    return max(float((y - lp(x)).abs().max()), float((y - es(x)).abs().max()))


# --------------------------------------------------------------------------- torch.compile


SEQ_SHAPES = [(8, 512), (16, 256), (13, 315), (32, 128), (4, 1024), (7, 585), (64, 64), (9, 455)]


def bench_compile(d: int, reps: int, device: str, dtype: torch.dtype) -> None:
    n, r = CONFIGS[0]
    print(f"\ntorch.compile(MELoRALinear n={n} r={r}, dynamic=True), d={d}, batches of ~4096 tokens "
          f"with varying (batch, seq):")
    try:
        import torch._dynamo
        from torch._dynamo.testing import CompileCounterWithBackend
    except Exception as e:  # noqa: BLE001
        print(f"  torch.compile unavailable: {type(e).__name__}: {e}")
        return
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    eager = melora(copy.deepcopy(base), n, r)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(eager, backend=counter, dynamic=True)
    hdr = f"  {'(batch, seq)':<14} {'tokens':>6} {'floor ms':>9} {'eager ms':>9} {'compiled ms':>12} " \
          f"{'eager/floor':>12} {'compiled/floor':>15} {'graphs so far':>14}"
    print(hdr)
    first_compile_s = None
    for b, s in SEQ_SHAPES:
        x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(b, s, d, device=device, dtype=dtype)
        try:
            t0 = time.perf_counter()
            step(compiled, x, g)  # compiles on the first shape (and on any recompilation)
            sync(device)
            if first_compile_s is None:
                first_compile_s = time.perf_counter() - t0
            # compare in grad mode: a no_grad call would compile a second graph
            err = float((compiled(x) - eager(x)).detach().abs().max())
            if err > (1e-3 if dtype == torch.float32 else 5e-2):
                print(f"  compiled output differs from eager by {err:.3g} at {(b, s)}")
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"  torch.compile failed on this machine: {type(e).__name__}: {msg}")
            return
        t = {k: statistics.median(v) for k, v in time_side_by_side(
            {"floor": base, "eager": eager, "compiled": compiled}, x, g, reps, device).items()}
        print(f"  {str((b, s)):<14} {b * s:>6} {t['floor']:>9.1f} {t['eager']:>9.1f} {t['compiled']:>12.1f} "
              f"{t['eager'] / t['floor']:>11.3f}x {t['compiled'] / t['floor']:>14.3f}x {counter.frame_count:>14}")
    print(f"  first compile (forward+backward): {first_compile_s:.1f} s; compiled graphs: {counter.frame_count} "
          f"for {len(SEQ_SHAPES)} shapes -> {max(counter.frame_count - 1, 0)} recompilations")


# --------------------------------------------------------------------------- fold threshold


class FoldChoice(nn.Module):
    """A MELoRALinear forced to fold (threshold 0) or not (threshold inf): the choice is made
    in forward, and that forward's backward follows it."""

    def __init__(self, layer: MELoRALinear, threshold: float):
        super().__init__()
        self.layer, self.threshold = layer, threshold

    def forward(self, x):
        import melora_lit.adapter.layer as core

        default, core._FOLD_TOKENS_PER_FEATURE = core._FOLD_TOKENS_PER_FEATURE, self.threshold
        try:
            return self.layer(x)
        finally:
            core._FOLD_TOKENS_PER_FEATURE = default


def bench_fold(dims: list[int], ratios: list[float], reps: int) -> None:
    """CPU kernels: the update folded into the weight vs. added to the activations, by tokens
    per feature. MELoRALinear folds from melora._FOLD_TOKENS_PER_FEATURE on."""
    from melora_lit.adapter.layer import _FOLD_TOKENS_PER_FEATURE

    if not kernels_on("cpu", torch.float32):
        print("\nfold sweep: needs the CPU kernels")
        return
    print(f"\nCPU kernels, n=8 r=1, median of per-round ratios to the floor over {reps} rounds "
          f"(MELoRALinear folds from {_FOLD_TOKENS_PER_FEATURE} tokens per feature):")
    print(f"  {'d':>5} {'tokens':>7} {'tokens/d':>9} {'floor ms':>9} {'folded':>8} {'added':>8}")
    for d in dims:
        torch.manual_seed(0)
        base = nn.Linear(d, d).requires_grad_(False)
        layer = melora(copy.deepcopy(base), 8, 1)
        variants = {"floor": base, "folded": FoldChoice(layer, 0), "added": FoldChoice(layer, float("inf"))}
        for ratio in ratios:
            tokens = int(ratio * d)
            x = torch.randn(tokens, d, requires_grad=True)
            g = torch.randn(tokens, d)
            times = time_side_by_side(variants, x, g, reps, "cpu")
            print(f"  {d:>5} {tokens:>7} {ratio:>9.2f} {statistics.median(times['floor']):>9.2f} "
                  f"{paired_ratio(times['folded'], times['floor']):>7.3f}x "
                  f"{paired_ratio(times['added'], times['floor']):>7.3f}x")


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 4096], help="d_in = d_out of the layer")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--reps", type=int, default=11, help="timed rounds at d <= 1024")
    p.add_argument("--reps-large", type=int, default=3, help="timed rounds at d > 1024 (slow on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    p.add_argument("--compile-dim", type=int, default=768)
    p.add_argument("--only", metavar="REGEX", default=None,
                   help="time only the variants whose name matches (the floor always), e.g. 'n=8 r=1' "
                        "for more rounds of the headline comparison")
    p.add_argument("--fold-sweep", action="store_true",
                   help="only the folded-vs-added sweep over tokens per feature (CPU kernels)")
    p.add_argument("--baseline", metavar="MELORA_PY", default=None,
                   help="also time the MELoRALinear of this file, e.g. an older core: "
                        "git show REV:src/melora_lit/adapter/layer.py > /tmp/melora_old.py")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {str(dtype).replace('torch.', '')}, "
          f"{args.tokens} tokens, forward+backward (input requires grad), train mode")
    print(f"MELoRALinear path: {'fused CPU kernels' if kernels_on(args.device, dtype) else 'plain torch'} "
          f"(MELORA_LIT_CPU_KERNELS={cpu_kernels.kernels_setting()})")

    if args.fold_sweep:
        bench_fold([d for d in args.dims if d <= 1024] or [768], [0.5, 1, 2, 4, 6, 10], args.reps)
        return

    results: dict[int, dict[str, float]] = {}
    for d in args.dims:
        reps = args.reps if d <= 1024 else args.reps_large
        err = check_agreement(d, args.device, dtype)
        variants = build_variants(d, args.device, dtype,
                                  load_baseline(args.baseline) if args.baseline else None)
        if args.only:
            variants = {k: v for i, (k, v) in enumerate(variants.items()) if i == 0 or re.search(args.only, k)}
        x = torch.randn(args.tokens, d, device=args.device, dtype=dtype, requires_grad=True)
        g = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
        t0 = time.perf_counter()
        samples = time_side_by_side(variants, x, g, reps, args.device)
        floor_s = samples["frozen nn.Linear (floor)"]
        results[d] = {k: (statistics.median(v), paired_ratio(v, floor_s),
                          min(v) / min(floor_s)) for k, v in samples.items()}
        print(f"d={d}: {reps} rounds in {time.perf_counter() - t0:.0f} s; MELoRA vs loop vs einsum "
              f"max abs diff {err:.2g}")
        del variants, x, g

    names = list(next(iter(results.values())))
    width = max(len(n) for n in names)
    cols = "".join(f" | {'d=' + str(d) + ' ms':>11} {'/floor':>7} {'min/floor':>9}" for d in results)
    print("\nmedian ms; /floor = median of per-round ratios to the floor; min/floor = ratio of the minima")
    print(f"{'variant':<{width}}{cols}")
    print("-" * (width + 32 * len(results)))
    for name in names:
        row = "".join(f" | {results[d][name][0]:>11.2f} {results[d][name][1]:>6.3f}x {results[d][name][2]:>8.3f}x"
                      for d in results)
        print(f"{name:<{width}}{row}")

    print()
    for d, res in results.items():
        key = "MELoRALinear n=8 r=1"
        if key in res:
            ratio = res[key][1]
            verdict = ("target <= 1.05x: " + ("met" if ratio <= 1.05 else "MISSED")
                       if d == 768 and dtype == torch.float32 and args.device == "cpu" else "no target")
            print(f"d={d}: MELoRA n=8 r=1 = {ratio:.3f}x the floor ({verdict})")
        for n, r in CONFIGS:
            if n >= 8 and f"MELoRALinear n={n} r={r}" in res and f"per-block loop n={n} r={r}" in res:
                m, lp = res[f"MELoRALinear n={n} r={r}"][1], res[f"per-block loop n={n} r={r}"][1]
                print(f"d={d}: n={n} r={r}: MELoRA {m:.3f}x vs loop {lp:.3f}x the floor -> "
                      f"{'not slower' if m <= lp else 'SLOWER'} ({m / lp:.3f}x the loop)")
        drop = {k.split(", dropout")[0] + k.split(f"dropout {DROPOUT}")[1]: v[1] for k, v in res.items() if "dropout" in k}
        if drop:
            print(f"d={d}: dropout {DROPOUT}: " + ", ".join(f"{k} {v:.3f}x" for k, v in drop.items()))

    if not args.no_compile:
        bench_compile(args.compile_dim, max(3, args.reps // 2), args.device, dtype)


if __name__ == "__main__":
    main()
