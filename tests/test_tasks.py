"""The task owns its differences (issue 26, item 1): tasks are found through a registry, no other
module compares task names, the quickstart's checkpoint monitor follows the task the command
chose, and the GLUE leaderboard files reach the prediction writer through the data module."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import yaml

from melora_lit.training.tasks import DEFAULT_TASK, Task, task_class, task_names

SRC = Path(__file__).resolve().parents[1] / "src" / "melora_lit"
TASK_MODULES = {"training/tasks.py", "training/classification.py", "training/causal_lm.py"}


def test_tasks_register_by_name_and_an_unknown_one_is_one_line():
    from melora_lit.data.base import DataTask
    from melora_lit.training import CausalLM, MELoRAModule, SequenceClassification

    assert task_names() == ("sequence-classification", "causal-lm")
    assert task_class("causal-lm") is CausalLM and task_class(None) is task_class(DEFAULT_TASK) is SequenceClassification
    # the declared choices of the CLI option and of the data modules are the registered tasks
    choices = typing.get_args(typing.get_type_hints(MELoRAModule.__init__)["task"])
    assert set(choices) == set(typing.get_args(DataTask)) == set(task_names())
    with pytest.raises(ValueError) as err:
        task_class("token-classification")
    assert str(err.value) == ("task='token-classification' is not valid; use one of sequence-classification, "
                              "causal-lm")


@pytest.mark.parametrize("name", ["sequence-classification", "causal-lm"])
def test_each_task_describes_itself_and_monitors_what_it_logs(name):
    cls = task_class(name)
    task = cls.create(num_labels=3, label_names=None, generation=None)
    assert isinstance(task, Task) and task.name == name
    logged = {f"val/{k}" for k in [*task.build_metrics(None).keys(), "loss"]}
    assert cls.default_monitor[0] in logged and cls.default_monitor[1] in ("min", "max")
    assert cls.prediction_file in ("predictions.csv", "predictions.jsonl")
    assert cls.auto_model_class.startswith("AutoModelFor") and cls.pipeline_tag
    assert cls.generates == cls.lm_eval == (name == "causal-lm")


def _task_names_compared(tree: ast.AST) -> list[int]:
    """Lines that compare a task name (a string constant of a registered task, or ``is_causal_lm``)."""
    names = set(task_names())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            consts = [p for p in parts if isinstance(p, ast.Constant) and p.value in names]
            consts += [e for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set)) for e in p.elts
                       if isinstance(e, ast.Constant) and e.value in names]
            if consts:
                lines.append(node.lineno)
        elif isinstance(node, (ast.Name, ast.Attribute, ast.Constant)):
            text = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else node.value
            if text == "is_causal_lm":
                lines.append(node.lineno)
    return lines


def test_no_module_but_the_tasks_compares_task_names():
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel not in TASK_MODULES:
            lines = _task_names_compared(ast.parse(path.read_text()))
            if lines:
                found[rel] = lines
    assert found == {}, f"task names compared outside the task classes (ask task_class(name) instead): {found}"
    # the check does see a comparison
    assert _task_names_compared(ast.parse('if hp.task != "causal-lm": pass')) == [1]


def _imports(path: Path) -> set[str]:
    """Modules a file imports (relative ones resolved against melora_lit), at any depth."""
    package = ["melora_lit", *path.relative_to(SRC).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            out.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out


def _module_graph() -> dict[str, set[str]]:
    """melora_lit's modules and the package modules each imports (``from . import x`` included)."""
    names = {}
    for path in SRC.rglob("*.py"):
        parts = ["melora_lit", *path.relative_to(SRC).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        targets = set()
        for imported in _imports(path):
            targets |= {m for m in names if m == imported or m.startswith(imported + ".") and
                        m.rsplit(".", 1)[0] == imported and names[m].name != "__init__.py"} & _named(imported, path)
        graph[name] = {t for t in targets if t != name}
    return graph


def _named(imported: str, path: Path) -> set[str]:
    """``imported`` and, for ``from imported import a, b``, ``imported.a``/``imported.b``."""
    out = {imported}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out |= {f"{imported}.{alias.name}" for alias in node.names}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), packages' ``__init__`` left out:
    they re-export their modules."""
    inits = {m for m in graph if (SRC / Path(*m.split(".")[1:]) / "__init__.py").is_file() or m == "melora_lit"}
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v] - inits:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(set(graph) - inits):
        if v not in index:
            visit(v)
    return groups


def test_the_layers_import_downwards_only_and_no_module_imports_itself_back():
    """errors and adapter/ (torch only) < the neutral modules (metrics, loading, run, sources,
    fingerprint) < data/ < training/ < the commands: data imports nothing from training, the
    neutral ones nothing from data, training or the commands; and no import
    cycle between modules (tasks and their subclasses, glue and its submission files, the
    commands among themselves)."""
    graph = _module_graph()
    layer = {"adapter": 0, "data": 2, "training": 3}
    neutral = {f"melora_lit.{m}" for m in ("metrics", "loading", "run", "sources", "fingerprint")}

    def rank(module: str) -> int:
        part = module.split(".")[1] if module.count(".") else ""
        return 0 if module == "melora_lit.errors" else 1 if module in neutral else layer.get(part, 4)

    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if b != "melora_lit" and rank(b) > rank(a))
    assert upward == [], f"imports of a higher layer: {upward}"
    assert _cycles(graph) == []
    # the prediction writer gets GLUE's files from the data module, not from data.glue_submission
    assert not any(m.startswith("melora_lit.data.glue") for m in graph["melora_lit.training.prediction"])
    # the check does see an upward import and a cycle
    assert rank("melora_lit.training.resume") > rank("melora_lit.data.base") > rank("melora_lit.loading")
    assert _cycles({"a.x": {"a.y"}, "a.y": {"a.x"}}) == [["a.x", "a.y"]]


@pytest.mark.parametrize("args, expected", [
    ([], ("val/accuracy", "max")),  # the quickstart's own, a classifier's
    (["--model.task", "causal-lm"], ("val/loss", "min")),
    (["--model.task=causal-lm", "--checkpoint.monitor", "val/perplexity"], ("val/perplexity", "min")),
    (["--checkpoint.mode", "min", "--model.task", "causal-lm"], ("val/loss", "min")),
    (["--model.task", "causal-lm", "--checkpoint.mode", "max"], ("val/loss", "max")),
])
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_without_config_the_checkpoint_monitor_is_the_tasks_and_a_typed_one_wins(args, expected, capsys):
    from melora_lit.cli import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["checkpoint"]["monitor"], printed["checkpoint"]["mode"]) == expected


def test_the_glue_data_module_gives_its_leaderboard_files_only_for_a_test_split(tmp_path, dropout_bert):
    from melora_lit.data import GLUEDataModule
    from melora_lit.data.glue_submission import GLUESubmission

    rows = [["index", "sentence1", "sentence2", "label"], *[[str(i), "a cat", "a dog", "entailment"]
                                                           for i in range(4)]]
    for split in ("train", "dev"):
        (tmp_path / "RTE").mkdir(exist_ok=True)
        (tmp_path / "RTE" / f"{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (tmp_path / "RTE" / "test.tsv").write_text("index\tsentence1\tsentence2\n0\ta cat\ta dog\n1\ta\tb\n")
    writers = {}
    for split in ("validation", "test"):
        dm = GLUEDataModule(task="rte", data_dir=str(tmp_path), tokenizer=dropout_bert, max_length=16,
                            predict_split=split, cache_dir=str(tmp_path / "cache"))
        dm.setup("predict")
        writers[split] = dm.submission_writer()
    assert writers["validation"] is None and isinstance(writers["test"], GLUESubmission)
    written = writers["test"].write([{"glue_file": "RTE", "index": "0", "prediction": "entailment"}],
                                    tmp_path / "out", ["entailment", "not_entailment"])
    assert written == [tmp_path / "out" / "RTE.tsv"]
    assert written[0].read_text() == "index\tprediction\n0\tentailment\n"


def test_what_only_a_generating_task_does_is_refused_for_a_classifier_in_one_line():
    from types import SimpleNamespace

    import torch

    from melora_lit.training.generation_eval import GenerationEvaluation
    from melora_lit.training.module import MELoRAModule

    classifier = MELoRAModule("unused-backbone", num_labels=2)  # nothing is loaded before configure_model
    assert classifier.task.forward_defaults == {} and dict(task_class("causal-lm").forward_defaults) == {
        "use_cache": False}
    with pytest.raises(ValueError, match=r"^generate\(\) needs --model.task causal-lm, this model is "
                                         r"sequence-classification$"):
        classifier.generate(torch.ones(1, 3, dtype=torch.long))
    chat = SimpleNamespace(generation_examples=lambda n: ([], []))
    trainer = SimpleNamespace(sanity_checking=False, datamodule=chat)
    with pytest.raises(ValueError, match="GenerationEvaluation needs a causal LM"):
        GenerationEvaluation(num_examples=2).on_validation_epoch_end(trainer, classifier)
