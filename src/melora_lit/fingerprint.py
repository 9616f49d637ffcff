"""Fingerprints of what a run trains on, recorded in every checkpoint ``fit`` writes and compared
when a run resumes (:func:`melora_lit.training.checkpoints.check_fingerprints`): the data is part
of the run, and so is the backbone.

* A data file: its size and sha256, read in chunks (:func:`file_fingerprint`); a folder (the BBC
  News corpus): its files' count, total size and one sha256 over their names and digests. A hub
  dataset: the same of its cache files (``datasets`` has no public fingerprint).
* A backbone (:func:`backbone_fingerprint`): its ``config.json`` (less where and with which
  transformers it was saved) and each weight file's size and :func:`sampled_digest`, cheap for a
  7B model too; for a GGUF model, the GGUF file itself.

Standard library only (``huggingface_hub`` lazily, for a hub model's cache folder).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from itertools import zip_longest
from pathlib import Path
from typing import Any

__all__ = ["backbone_fingerprint", "file_fingerprint", "fingerprint_changes", "sampled_digest", "source_fingerprint"]

_CHUNK = 1 << 20
# a weight file's digest reads its header and 64 blocks of 64 KiB spread over it: 4 MiB per file
# whatever its size (a 5 GB shard: one block every 80 MB, several in every layer's tensors)
_BLOCK, _BLOCKS = 1 << 16, 64
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"path", "size", "sha256"}`` of a file; of a folder, over every file under it (sorted
    names, so the same files anywhere give the same digest), with ``"files"`` their count."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return {"path": str(path), "size": path.stat().st_size, "sha256": _sha256(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()}\0{_sha256(p)}\n".encode())
    return {"path": str(path), "files": len(files), "size": sum(p.stat().st_size for p in files),
            "sha256": digest.hexdigest()}


def source_fingerprint(source: Any) -> list[dict[str, Any]]:
    """The fingerprints of one data source: a path (file or folder), or a ``datasets.Dataset``
    (its cache files; none for a dataset held in memory, which comes from files listed apart)."""
    if isinstance(source, (str, Path)):
        return [file_fingerprint(source)]
    return [file_fingerprint(f["filename"]) for f in getattr(source, "cache_files", None) or []]


def sampled_digest(path: str | Path) -> str:
    """sha256 of a weight file, whole up to 8 MiB; of a larger one, its safetensors header (the
    names, shapes and offsets of every tensor) and :data:`_BLOCKS` fixed blocks spread over it."""
    path = Path(path)
    size = path.stat().st_size
    if size <= 2 * _BLOCK * _BLOCKS:
        return _sha256(path)
    digest = hashlib.sha256(f"sampled {size}\n".encode())
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            head = f.read(8)
            start = 8 + int.from_bytes(head, "little") if len(head) == 8 else 0
            start = start if start < size else 0
            f.seek(0)
            digest.update(f.read(start))
        span = size - start - _BLOCK
        for i in range(_BLOCKS):
            f.seek(start + i * span // (_BLOCKS - 1))
            digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _model_folder(resolved: str) -> Path | None:
    """The local folder ``from_pretrained`` loads a resolved source from (a hub model's cache
    snapshot), or None where it is not on this machine yet."""
    if Path(resolved).expanduser().is_dir():
        return Path(resolved).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(resolved, "config.json")
    except Exception:  # noqa: BLE001 - not a hub name: nothing cached to read
        return None
    return Path(found).parent if isinstance(found, str) else None


def backbone_fingerprint(name_or_path: str, gguf_file: str | None = None) -> dict[str, Any]:
    """``{"source", "config", "weights"}`` of a model source (see :mod:`melora_lit.sources`): the
    ``config.json`` dict it loads with, and ``{"file", "size", "sha256"}`` (a
    :func:`sampled_digest`) of each weight file: the safetensors files where there are any (what
    transformers loads), else the others; a GGUF model's GGUF file. ``config`` None and no
    ``weights`` where the files are not on this machine yet (a hub model not downloaded)."""
    from .sources import locate_gguf, resolve_pretrained

    located = locate_gguf(name_or_path, gguf_file)
    folder = _model_folder(resolve_pretrained(name_or_path, gguf_file))
    config = None
    if folder is not None and (folder / "config.json").is_file():
        config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                  if k not in _VOLATILE_CONFIG}
    if located is not None and (Path(located[0]) / located[1]).is_file():
        weights = [Path(located[0]) / located[1]]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if folder is not None else []
        weights = [p for p in files if p.suffix == ".safetensors"] or files
    return {"source": name_or_path if not gguf_file else f"{name_or_path} ({gguf_file})", "config": config,
            "weights": [{"file": p.name, "size": p.stat().st_size, "sha256": sampled_digest(p)} for p in weights]}


# ----------------------------------------------------------------------------- comparing
def _short(digest: str | None) -> str:
    return (digest or "?")[:12]


def _files_change(what: str, old: Iterable[Mapping], new: Iterable[Mapping], key: str = "path",
                  where: str = "") -> str | None:
    """How the ``what`` files (of ``where``) changed, the first that differs, or None."""
    for before, after in zip_longest(old, new):
        if after is None or before is None:
            return f"{what} file {(before or after)[key]}{where} is {'no longer read' if after is None else 'new'}"
        if (before.get("sha256"), before.get("size")) != (after.get("sha256"), after.get("size")):
            size = (f"size {before.get('size')} -> {after.get('size')} bytes, "
                    if before.get("size") != after.get("size") else "")
            moved = f", was {before[key]}" if before[key] != after[key] else ""
            return (f"{what} file {after[key]}{where} changed ({size}sha256 {_short(before.get('sha256'))} -> "
                    f"{_short(after.get('sha256'))}{moved})")
    return None


#: split settings saved under an older name (checkpoints before the rename still compare equal)
_RENAMED_SETTINGS = {"val_fraction": "val_size"}


def _renamed(settings: dict[str, Any]) -> dict[str, Any]:
    return {_RENAMED_SETTINGS.get(k, k): v for k, v in settings.items()}


def _split_change(name: str, old: Mapping, new: Mapping) -> str | None:
    what = "train" if name == "train" else "validation" if name == "val" else f"validation ({name})"
    old_settings, new_settings = _renamed(old.get("settings") or {}), _renamed(new.get("settings") or {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            return f"the {what} split's {key} changed ({old_settings.get(key)!r} -> {new_settings.get(key)!r})"
    change = _files_change(what, old.get("files") or [], new.get("files") or [])
    rows = f"rows {old.get('rows')} -> {new.get('rows')}" if old.get("rows") != new.get("rows") else ""
    if change and rows and change.endswith(")"):
        return f"{change[:-1]}, {rows})"
    return change or (f"the {what} split changed ({rows})" if rows else None)


def _diff_keys(old: Mapping, new: Mapping, limit: int = 3) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fingerprint_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(part, how it changed)`` for each part of a run whose fingerprint differs, in order: the
    training data (``train_data``), the validation sets (``val_data``), the backbone
    (``backbone``: its config first, then its weights). What either side lacks (a checkpoint from
    before fingerprints, a data module outside the contract, a hub model not downloaded yet) is
    not compared. A validation set held out of the training data changes with it: the training
    data's change covers it."""
    changes = []
    old_data, new_data = saved.get("data") or {}, current.get("data") or {}
    for name in [n for n in new_data if n in old_data]:
        change = _split_change(name, old_data[name], new_data[name])
        held_out = (new_data[name].get("settings") or {}).get("held_out_of") == "train"
        if change and not (held_out and changes and changes[0][0] == "train_data"):
            changes.append(("train_data" if name == "train" else "val_data", change))
    old, new = saved.get("backbone") or {}, current.get("backbone") or {}
    where = f" of {new.get('source')}"
    if old.get("config") and new.get("config") and old["config"] != new["config"]:
        changes.append(("backbone", f"config.json{where} changed ({_diff_keys(old['config'], new['config'])})"))
    elif old.get("weights") and new.get("weights"):
        change = _files_change("weights", old["weights"], new["weights"], key="file", where=where)
        if change:
            changes.append(("backbone", change))
    return changes
