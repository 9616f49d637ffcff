"""``melora-lit report``: compare runs from their logs (TensorBoard event files or a CSV logger's
``metrics.csv``) and saved configs.

    melora-lit report lightning_logs benchmarks/runs/rte --output report/

Each RUN_DIR is a run's version folder (it holds ``events.out.tfevents.*`` or ``metrics.csv``) or a folder searched
recursively for such folders. Folders whose event files have no ``train/`` scalar (a
``validate``, ``test`` or ``predict`` run) are left out. For each run, from ``config.yaml``
(written by the CLI), ``hparams.yaml`` and the event files:

* task: ``data.init_args.task`` (GLUE), else the data module's class name;
* method: LoRA when n = 1, else MELoRA; n, r and the equivalent rank n·r (of the config; per-module
  ``rank_pattern``/``n_pattern`` overrides are not shown);
* trainable and adapter parameters (``hparams.yaml``, logged when ``fit`` starts);
* the best validation metric and its epoch (Lightning's 0-based epoch, as in checkpoint names):
  the checkpoint's ``monitor`` and ``mode`` of ``config.yaml``, else the task's main metric
  (:func:`melora_lit.metrics.main_metric`: accuracy, Matthews for CoLA, Pearson for STS-B, loss
  for causal LMs);
* wall time: first to last event of each event file, summed over the files (a resumed run's
  pause between its processes does not count); not known from a CSV log alone.

Writes ``report.md`` (a table of runs, plus mean ± std over seeds of each task/method/n/r/
trainable-parameter setting when some setting has two runs or more), ``report.csv`` (one row per
run) and ``report.png`` (best validation metric against trainable parameters, log x axis; one
colour per task, one marker per method; with seeds, the mean and its standard deviation).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import OneLineArgumentParser, check_writable, first_line
from .run import check_protected, remove_stale_temp_files, staged

__all__ = ["RunSummary", "find_runs", "read_run", "build_report", "report_main"]

_EVENTS = "events.out.tfevents.*"
_CSV_METRICS = "metrics.csv"  # Lightning's CSVLogger


@dataclass
class RunSummary:
    """What the report shows of one run."""

    run: str
    task: str
    method: str | None
    n: int | None
    r: int | None
    rank: int | None
    trainable_params: int | None
    adapter_params: int | None
    seed: Any
    metric: str | None
    mode: str | None
    best: float | None
    best_epoch: int | None
    best_step: int | None
    wall_time_s: float | None
    model: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Version folders (folders holding event files) at or under each path, in order, once each."""
    runs: list[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"run folder not found: {p}")
        if not path.is_dir():
            raise ValueError(f"not a folder: {p} (give a run's version folder or a folder of runs)")
        if any(path.glob(_EVENTS)) or (path / _CSV_METRICS).is_file():
            found = [path]
        else:
            found = sorted({f.parent for pattern in (_EVENTS, _CSV_METRICS) for f in path.rglob(pattern) if f.is_file()},
                           key=_natural_key)
        if not found:
            raise ValueError(f"no runs in {p}: no TensorBoard event files (events.out.tfevents.*) or CSV logs "
                             f"({_CSV_METRICS}) under it")
        for run in found:
            if run.resolve() not in {r.resolve() for r in runs}:
                runs.append(run)
    return runs


def _natural_key(path: Path) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _load_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _section(config: dict, key: str) -> dict:
    sec = config.get(key)
    if not isinstance(sec, dict):
        return {}
    init = sec.get("init_args")
    return {**sec, **init} if isinstance(init, dict) else sec


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _wall_time(run: Path) -> float | None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    total, seen = 0.0, False
    for f in sorted(run.glob(_EVENTS)):
        first = last = None
        try:
            for event in EventFileLoader(str(f)).Load():
                if event.wall_time:
                    first = event.wall_time if first is None else min(first, event.wall_time)
                    last = event.wall_time if last is None else max(last, event.wall_time)
        except Exception:  # a truncated or damaged file: count what was read
            pass
        if first is not None:
            total += last - first
            seen = True
    return total if seen else None


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged scalars, ``{tag: [(step, value), ...]}``: from the event files, and from a CSV
    logger's ``metrics.csv`` for the tags the event files do not have."""
    scalars = _event_scalars(run) if any(run.glob(_EVENTS)) else {}
    for tag, series in _csv_scalars(run / _CSV_METRICS).items():
        scalars.setdefault(tag, series)
    return scalars


def _csv_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """A CSVLogger ``metrics.csv``: one row per logging call, columns ``step``, ``epoch`` and the
    metrics, empty where a row has no value."""
    if not path.is_file():
        return {}
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _int(_float(row.get("step")))
            if step is None:
                continue
            for tag, text in row.items():
                value = _float(text)
                if tag != "step" and tag is not None and value is not None:
                    scalars.setdefault(tag, []).append((step, value))
    return scalars


def _float(text: Any) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _event_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 1, "tensors": 1, "images": 1,
                                                    "audio": 1, "compressedHistograms": 1})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def read_run(run: str | Path) -> RunSummary | None:
    """The summary of one version folder; None when it is no training run (no ``train/`` scalar)."""
    from .metrics import main_metric

    run = Path(run)
    scalars = _scalars(run)
    if not any(tag.startswith("train/") for tag in scalars):
        return None
    config = _load_yaml(run / "config.yaml")
    hparams = _load_yaml(run / "hparams.yaml")
    model = _section(config, "model")
    data = _section(config, "data")
    notes: list[str] = []

    task = data.get("task") if isinstance(data.get("task"), str) else None
    if task is None:
        class_path = (config.get("data") or {}).get("class_path") if isinstance(config.get("data"), dict) else None
        task = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else "?"
    melora = hparams.get("melora") if isinstance(hparams.get("melora"), dict) else model.get("melora")
    melora = melora if isinstance(melora, dict) else {}
    n, r = _int(melora.get("n")), _int(melora.get("r"))
    if melora.get("rank_pattern") or melora.get("n_pattern"):
        notes.append("per-module rank_pattern/n_pattern")

    metric = mode = None
    ckpt = _section(config, "checkpoint")
    if isinstance(ckpt.get("monitor"), str) and ckpt["monitor"]:
        metric, mode = ckpt["monitor"], ckpt.get("mode") if ckpt.get("mode") in ("min", "max") else "min"
    elif isinstance(hparams.get("hp_metric_monitor"), str):
        metric = hparams["hp_metric_monitor"]
        mode = hparams.get("hp_metric_mode") if hparams.get("hp_metric_mode") in ("min", "max") else None
    if metric is None or metric not in scalars:
        found = main_metric(scalars)
        if metric is None and found is not None:
            metric, mode = found
    if metric is not None and mode is None:
        mode = "min" if metric.rsplit("/", 1)[-1] in ("loss", "perplexity") else "max"

    best = best_epoch = best_step = None
    series = [(s, v) for s, v in scalars.get(metric or "", []) if not math.isnan(v)]
    if series:
        best = (max if mode == "max" else min)(v for _, v in series)
        best_step = next(s for s, v in series if v == best)  # the first of equal values
        epochs = dict(scalars.get("epoch", []))
        if best_step in epochs:
            best_epoch = int(epochs[best_step])
        elif epochs:
            earlier = [s for s in epochs if s <= best_step]
            best_epoch = int(epochs[max(earlier)]) if earlier else None
    elif metric is not None:
        notes.append(f"no {metric} logged")

    seed = config.get("seed_everything")
    return RunSummary(
        run=str(run), task=task, method=None if n is None else ("LoRA" if n == 1 else "MELoRA"), n=n, r=r,
        rank=n * r if n is not None and r is not None else None,
        trainable_params=_int(hparams.get("trainable_params")), adapter_params=_int(hparams.get("adapter_params")),
        seed=seed if isinstance(seed, (int, str)) and not isinstance(seed, bool) else None,
        metric=metric, mode=mode, best=best, best_epoch=best_epoch, best_step=best_step,
        wall_time_s=_wall_time(run), model=model.get("model_name_or_path") or hparams.get("model_name_or_path"),
        notes=notes,
    )


# ----------------------------------------------------------------------------- writing
def _fmt_int(v: int | None) -> str:
    return "—" if v is None else f"{v:,}"


def _fmt_metric(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _cell(v: Any) -> str:
    return "—" if v is None else str(v).replace("|", "\\|")


def _short(run: str, root: Path | None) -> str:
    if root is not None:
        try:
            return str(Path(run).resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return run


def _common_root(runs: list[RunSummary]) -> Path | None:
    import os

    if not runs:
        return None
    try:
        common = Path(os.path.commonpath([str(Path(r.run).resolve()) for r in runs]))
    except ValueError:
        return None
    common = common.parent  # one level of context: lightning_logs/version_0
    return None if common == Path(common.anchor) else common


def _from_cwd(path: Path) -> str:
    """The path relative to the working directory when it is below it (reports get committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _groups(runs: list[RunSummary]) -> dict[tuple, list[RunSummary]]:
    groups: dict[tuple, list[RunSummary]] = defaultdict(list)
    for r in runs:
        groups[(r.task, r.method, r.n, r.r, r.trainable_params, r.metric)].append(r)
    return dict(groups)


def _sort_key(r: RunSummary) -> tuple:
    return (r.task, r.trainable_params or 0, r.method or "", r.n or 0, r.r or 0, str(r.seed), r.run)


def _markdown(runs: list[RunSummary], groups: dict[tuple, list[RunSummary]], root: Path | None,
              skipped: list[str]) -> str:
    lines = ["# melora-lit report", ""]
    where = f" under `{_from_cwd(root)}`" if root is not None else ""
    lines += [f"{len(runs)} run{'s' if len(runs) != 1 else ''}{where}. Best validation metric: the "
              "checkpoint's monitor, else the task's main metric; epoch is 0-based.", ""]
    head = ["run", "task", "method", "n", "r", "rank n·r", "trainable params", "adapter params", "seed",
            "metric", "best", "epoch", "wall time"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * 6 + ["---"] + ["--:"] * 3) + "|"]
    for r in runs:
        run = _short(r.run, root) + (f" ({'; '.join(r.notes)})" if r.notes else "")
        lines.append("| " + " | ".join([
            _cell(run), _cell(r.task), _cell(r.method), _cell(r.n), _cell(r.r), _cell(r.rank),
            _fmt_int(r.trainable_params), _fmt_int(r.adapter_params), _cell(r.seed), _cell(r.metric),
            _fmt_metric(r.best), _cell(r.best_epoch), _fmt_time(r.wall_time_s)]) + " |")
    if any(len(g) >= 2 for g in groups.values()):
        lines += ["", "## Mean ± std over seeds", "",
                  "Runs of the same task, method, n, r and trainable parameters; sample standard deviation.", ""]
        head = ["task", "method", "n", "r", "rank n·r", "trainable params", "metric", "runs", "seeds",
                "best (mean ± std)", "mean wall time"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * 4 + ["---"] + ["--:"] * 4) + "|"]
        for key, members in sorted(groups.items(), key=lambda kv: _sort_key(kv[1][0])):
            task, method, n, r, trainable, metric = key
            vals = [m.best for m in members if m.best is not None]
            if len(vals) >= 2:
                best = f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"
            else:
                best = _fmt_metric(vals[0]) if vals else "—"
            times = [m.wall_time_s for m in members if m.wall_time_s is not None]
            seeds = ", ".join(str(m.seed) for m in members if m.seed is not None) or "—"
            lines.append("| " + " | ".join([
                _cell(task), _cell(method), _cell(n), _cell(r), _cell(n * r if n and r else None),
                _fmt_int(trainable), _cell(metric), str(len(members)), _cell(seeds), best,
                _fmt_time(statistics.mean(times) if times else None)]) + " |")
    if skipped:
        lines += ["", f"Left out (no `train/` scalar: not a training run): {', '.join(f'`{s}`' for s in skipped)}"]
    return "\n".join(lines) + "\n"


def _plot(groups: dict[tuple, list[RunSummary]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    markers = {"LoRA": "o", "MELoRA": "^"}
    points = []
    for (task, method, n, r, trainable, metric), members in groups.items():
        vals = [m.best for m in members if m.best is not None]
        if trainable and vals:
            std = statistics.stdev(vals) if len(vals) >= 2 else 0.0
            points.append((task, method, n, r, trainable, metric, statistics.mean(vals), std))
    tasks = sorted({p[0] for p in points})
    colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for task, method, n, r, trainable, metric, mean, std in points:
        ax.errorbar(trainable, mean, yerr=std if std else None, fmt=markers.get(method, "s"),
                    color=colours[task], markersize=7, capsize=3)
        ax.annotate(f"n={n}, r={r}", (trainable, mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if points:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short range
        metric_of = {}
        for p in points:
            metric_of.setdefault(p[0], p[5])
        handles = [Line2D([], [], color=colours[t], marker="s", linestyle="", label=f"{t} ({metric_of[t]})")
                   for t in tasks]
        handles += [Line2D([], [], color="grey", marker=m, linestyle="", label=name)
                    for name, m in markers.items() if any(p[1] == name for p in points)]
        ax.legend(handles=handles, fontsize=8, loc="best")
        metrics = {p[5] for p in points}
        ax.set_ylabel(f"best {metrics.pop()}" if len(metrics) == 1 else "best validation metric (per task)")
    else:
        ax.text(0.5, 0.5, "no run with a validation metric and parameter counts", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("trainable parameters")
    ax.set_title("Validation metric against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def build_report(run_dirs: Sequence[str | Path], output: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Read the runs at or under ``run_dirs`` and write ``report.md``, ``report.csv`` and
    ``report.png`` into ``output``; returns ``{"markdown": …, "csv": …, "plot": …}``.

    Raises ``ValueError`` (one line) when a folder does not exist or holds no training run, or
    when ``output`` holds a report and ``overwrite`` is off (before anything is read).
    """
    if not run_dirs:
        raise ValueError("report: give at least one run folder")
    out = Path(output)
    names = ("report.md", "report.csv", "report.png")
    # the folder may hold other files: only the report's own are replaced; not in a run folder it reads
    check_protected(out, "report --output", [("RUN_DIR", d) for d in run_dirs])
    check_writable(out, "report --output")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise ValueError(f"report --output {output} already holds {', '.join(existing)}; pass --overwrite to "
                         f"replace the report")
    found = find_runs(run_dirs)
    runs: list[RunSummary] = []
    skipped: list[str] = []
    for run in found:
        try:
            summary = read_run(run)
        except Exception as err:  # one unreadable run must not hide the others
            print(f"melora-lit: report: skipping {run}: {first_line(err)}", file=sys.stderr)
            continue
        if summary is None:
            skipped.append(str(run))
        else:
            runs.append(summary)
    if not runs:
        raise ValueError(f"no training runs in {', '.join(map(str, run_dirs))}: "
                         f"{len(found)} folder(s) with event files but none with a train/ scalar")
    runs.sort(key=_sort_key)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    root = _common_root(runs)
    groups = _groups(runs)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv", "plot": out / "report.png"}
    # each file whole or absent: written beside, renamed into place (the plot first, the slowest)
    with staged(paths["plot"], "wb") as f:
        _plot(groups, f)
    with staged(paths["csv"], "w", newline="") as f:
        rows = [{**asdict(r), "notes": "; ".join(r.notes)} for r in runs]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with staged(paths["markdown"]) as f:
        f.write(_markdown(runs, groups, root, [_short(s, root) for s in skipped]))
    for kind, path in paths.items():
        print(f"melora-lit: wrote {kind} report to {path}")
    return paths


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="melora-lit report",
        description="Compare runs: a Markdown table (task, method, n, r, trainable and adapter parameters, "
                    "equivalent rank, best validation metric and its epoch, wall time; mean ± std over seeds), "
                    "a CSV and a plot of the validation metric against trainable parameters, from the runs' "
                    "TensorBoard event files, config.yaml and hparams.yaml.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run's version folder, or a folder searched recursively for version folders")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for report.md, report.csv, report.png")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the --output folder")
    return p


def report_main(args: Sequence[str]) -> dict[str, Path]:
    """``melora-lit report ...`` (args after ``report``)."""
    opts = _parser().parse_args(list(args))
    return build_report(opts.run_dirs, opts.output, opts.overwrite)
