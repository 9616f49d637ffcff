"""Every private Lightning member melora-lit uses (melora_lit.training.lightning_private) still
exists in the installed Lightning: an upgrade that drops one fails here, naming it, instead of
deep inside a training run."""

from __future__ import annotations

import importlib
import inspect
import re

import lightning
import pytest

from melora_lit.training.lightning_private import PRIVATE_MEMBERS


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
    # a method or class attribute, or an attribute the class sets on its instances in its code
    found = hasattr(owner, member) or (inspect.isclass(owner) and any(
        re.search(rf"\bself\.{re.escape(member)}\b\s*(:[^=]+)?=", inspect.getsource(cls))
        for cls in inspect.getmro(owner) if cls.__module__.startswith("lightning")))
    assert found, (f"Lightning {lightning.__version__} dropped {where}.{member}, which melora-lit uses in "
                   f"melora_lit.training.lightning_private: port that function, or pin lightning below this version")


def test_the_list_is_not_empty_and_names_only_private_members():
    assert PRIVATE_MEMBERS and all(m.startswith("_") for _, m in PRIVATE_MEMBERS)
