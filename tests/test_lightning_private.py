"""Every private Lightning member melora-lit uses (melora_lit.training.lightning_private) still
exists in the installed Lightning: an upgrade that drops one fails here, naming it, instead of
deep inside a training run. And no other file of melora-lit uses one: reading, writing or
overriding it, or importing a private name from Lightning."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from pathlib import Path

import lightning
import pytest

import melora_lit
from melora_lit.training.lightning_private import PRIVATE_MEMBERS

PACKAGE = Path(melora_lit.__file__).parent


def _has_member(owner, member: str) -> bool:
    """A method or class attribute, or an attribute the class sets on its instances in its code."""
    return hasattr(owner, member) or (inspect.isclass(owner) and any(
        re.search(rf"\bself\.{re.escape(member)}\b\s*(:[^=]+)?=", inspect.getsource(cls))
        for cls in inspect.getmro(owner) if cls.__module__.startswith("lightning")))


def _resolve(where: str):
    module, _, name = where.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        # a class path may name a module's attribute path one level deeper
        return importlib.import_module(where)


@pytest.mark.parametrize("where, member", PRIVATE_MEMBERS, ids=[f"{w}.{m}" for w, m in PRIVATE_MEMBERS])
def test_private_lightning_member_still_exists(where, member):
    try:
        owner = _resolve(where)
    except (ImportError, AttributeError):
        pytest.fail(f"Lightning {lightning.__version__} has no {where} any more; melora-lit uses its {member} in "
                    f"melora_lit.training.lightning_private: port that function, or pin lightning below this version")
    assert _has_member(owner, member), (f"Lightning {lightning.__version__} dropped {where}.{member}, which melora-lit uses in "
                   f"melora_lit.training.lightning_private: port that function, or pin lightning below this version")


def test_the_list_is_not_empty_and_names_only_private_members():
    assert PRIVATE_MEMBERS and all(m.startswith("_") for _, m in PRIVATE_MEMBERS)


# ----------------------------------------------------------------------------- no use elsewhere
def _defined_private_names(files) -> set[str]:
    """The ``_x`` names that ``files`` define: functions, classes, ``self._x =`` and assignments."""
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


@functools.cache
def _lightning_private_names() -> frozenset[str]:
    root = Path(lightning.__file__).parent
    return frozenset(_defined_private_names(p for part in ("pytorch", "fabric") for p in (root / part).rglob("*.py")))


def private_lightning_uses(package: Path = PACKAGE) -> list[str]:
    """``file:line: code`` of every use of a private Lightning member outside lightning_private.py:
    ``obj._x`` (or ``getattr(obj, "_x")``) where Lightning defines ``_x`` and melora-lit does not,
    a method or attribute ``_x`` of a class of melora-lit that overrides its Lightning base's, and
    ``from lightning... import _x`` or from a private Lightning module."""
    files = sorted(package.rglob("*.py"))
    ours = _defined_private_names(files)
    theirs = _lightning_private_names()
    uses = []
    for path in files:
        if path.name == "lightning_private.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {}  # local name -> "module.Name" of what the file imports from lightning
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
                imported.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
                if any(part.startswith("_") for part in node.module.split(".") + [a.name for a in node.names]):
                    uses.append((path, node))
            elif isinstance(node, ast.Import):
                imported.update({a.asname: a.name for a in node.names if a.asname and a.name.split(".")[0] == "lightning"})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in theirs - ours:
                uses.append((path, node))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and node.args[1].value in theirs - ours):
                uses.append((path, node))
            elif isinstance(node, ast.ClassDef):
                uses += [(path, n) for n in _overrides(node, imported, theirs)]
    return [f"{path.relative_to(package.parent)}:{node.lineno}: {ast.unparse(node).splitlines()[0]}"
            for path, node in uses]


def _overrides(cls: ast.ClassDef, imported: dict[str, str], theirs: frozenset[str]) -> list[ast.AST]:
    """The definitions in ``cls`` of a private member its Lightning bases have."""
    bases = []
    for base in cls.bases:
        dotted = ast.unparse(base)
        head, _, rest = dotted.partition(".")
        if head in imported:
            bases.append(_resolve(imported[head] + (f".{rest}" if rest else "")))
    if not bases:
        return []
    found = []
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            name = node.attr
        else:
            continue
        if name in theirs and any(_has_member(base, name) for base in bases):
            found.append(node)
    return found


def test_no_private_lightning_member_is_used_outside_lightning_private():
    uses = private_lightning_uses()
    assert not uses, ("private Lightning members used outside melora_lit/training/lightning_private.py (move each "
                      "into a function there, with why no public API does it):\n" + "\n".join(uses))


def test_the_scan_finds_a_planted_use(tmp_path):
    package = tmp_path / "melora_lit"
    (package / "training").mkdir(parents=True)
    (package / "training" / "lightning_private.py").write_text("x = trainer._checkpoint_connector\n")
    (package / "planted.py").write_text(
        "from lightning.pytorch.callbacks import ModelCheckpoint as MC\n"
        "from lightning.pytorch.utilities.imports import _TORCHVISION_AVAILABLE\n"
        "class Mine(MC):\n"
        "    def _save_last_checkpoint(self, trainer, candidates): pass\n"
        "def f(trainer, dm):\n"
        "    return trainer._checkpoint_connector, getattr(dm, '_log_hyperparams', False), dm._own\n"
        "def g(self):\n"
        "    self._own = 1\n")
    uses = private_lightning_uses(package)
    # the private import, the override, the read and the getattr; not lightning_private.py, not melora-lit's own _own
    assert sorted(u.split(": ", 1)[0] for u in uses) == [f"melora_lit/planted.py:{n}" for n in (2, 4, 6, 6)], uses


@pytest.mark.parametrize("args, kwargs", [((), {}), ((), {"every_n_train_steps": 5}), ((), {"every_n_epochs": 2}),
                                          ((None, None, None, False, None, 1, False, False, "min", True, 3), {})])
def test_the_settings_our_subclasses_keep_are_the_ones_lightning_keeps(args, kwargs):
    # the values read from our own constructors, against Lightning's private copies
    from melora_lit.training.checkpoints import ResumableCheckpoint
    from melora_lit.training.strategies import FSDP2Strategy, FSDPStrategy

    callback = ResumableCheckpoint(*args, **kwargs)
    assert callback.step_interval == callback._every_n_train_steps
    for sharded in (False, True):
        strategy = FSDP2Strategy(save_distributed_checkpoint=sharded)
        assert strategy.save_distributed_checkpoint == strategy._save_distributed_checkpoint == sharded
    for kind in ("full", "sharded"):
        assert FSDPStrategy(state_dict_type=kind).state_dict_type == FSDPStrategy(state_dict_type=kind)._state_dict_type


def test_fsdp1_sets_its_layer_policies_right_before_lightning_wraps(monkeypatch):
    # FSDP1 needs GPUs: Lightning's wrapping is replaced by a recorder, the hook order is what is checked
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    from melora_lit.training.strategies import FSDPStrategy
    from support import tiny_bert

    wrapped = []
    monkeypatch.setattr(LightningFSDP, "_setup_model", lambda self, model: wrapped.append(dict(self.kwargs)) or model)
    model = tiny_bert()
    assert FSDPStrategy()._setup_model(model) is model
    assert [type(w["auto_wrap_policy"]).__name__ for w in wrapped] == ["ModuleWrapPolicy"]
