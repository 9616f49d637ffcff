"""Run folders: each run gets its own ``version_N`` folder, created atomically, and
``--ckpt_path last`` finds the newest run's ``last.ckpt`` whatever the logger.

* :func:`allocate_version`: ``os.mkdir`` of ``version_N`` (fails if it exists: then N+1), so two
  runs started at the same time, on one machine or on several nodes of a shared filesystem,
  never share a folder. Only global rank 0 allocates; the other processes of a run learn the
  version from it (:func:`share_version`).
* :func:`find_last`: the run that ``--ckpt_path last`` continues: the newest run folder (highest
  ``version_N``) that has a ``last*.ckpt``; if that file cannot be read, a one-line error naming
  it (never an older run).
* :func:`remove_failed_run`: a run that failed before writing any checkpoint removes the folder
  it created (nothing in it is of use: a config and an event file).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["LAST", "LAST_OR_NEW", "allocate_version", "died_in_first_write", "find_last", "remove_failed_run",
           "version_of"]

#: ``--ckpt_path last``: continue the newest run; an error when there is none.
LAST = "last"
#: ``--ckpt_path auto``: continue the newest run, or start a new one when there is none (what a
#: job that is requeued after preemption runs with).
LAST_OR_NEW = "auto"
_VERSION = re.compile(r"version_(\d+)")


def _versions(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def allocate_version(root: str | os.PathLike) -> int:
    """Create ``root/version_N`` for the smallest free N above every existing version, atomically
    (``os.mkdir`` fails on an existing folder: then the next N); returns N."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing = _versions(root)
    version = existing[-1][0] + 1 if existing else 0
    while True:
        try:
            os.mkdir(root / f"version_{version}")
            return version
        except FileExistsError:
            version += 1


def version_of(folder: Path) -> int | str:
    """The logger ``version`` argument that names ``folder`` (``version_3`` -> 3)."""
    m = _VERSION.fullmatch(folder.name)
    return int(m.group(1)) if m else folder.name


def _last_files(checkpoints: Path) -> list[Path]:
    """``last*.ckpt`` in a checkpoint folder, newest first (Lightning's own rule: by time)."""
    if not checkpoints.is_dir():
        return []
    return sorted(checkpoints.glob("last*.ckpt"), key=_mtime, reverse=True)


def find_last(dirpath: Path | None, log_root: Path | None,
              default_dir: Path | None) -> tuple[Path | None, Path | None]:
    """``(last, dead)``: the ``last*.ckpt`` that ``--ckpt_path last`` resumes (None when no run
    has one), and the newest run folder when that run died in its first checkpoint write
    (:func:`died_in_first_write`), which ``auto`` starts again in place.

    With an explicit ``--checkpoint.dirpath``, the newest ``last*.ckpt`` in it. Otherwise the
    newest run: the highest ``version_N`` under ``log_root`` (the logger's ``save_dir/name``)
    that has a ``last*.ckpt``, or ``default_dir`` (``default_root_dir/checkpoints``, where a run
    without a logger writes) when its ``last*.ckpt`` is newer. An older run is never taken
    instead of the newest one, even when the newest one's file cannot be read."""
    if dirpath is not None:
        files = _last_files(dirpath)
        return (files[0] if files else None), None
    candidates = []
    for _, run in reversed(_versions(log_root) if log_root is not None else []):
        files = _last_files(run / "checkpoints")
        if files:
            candidates.append(files[0])
            break
        if died_in_first_write(run):
            return None, run  # the newest run has nothing to resume
    if default_dir is not None:
        candidates += _last_files(default_dir)[:1]
    if not candidates:
        return None, None
    return max(candidates, key=_mtime), None


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def died_in_first_write(run: Path) -> bool:
    """Whether ``run`` was killed while writing its first checkpoint: its checkpoint folder holds
    only temp files of writes whose process (on this host) is gone. Those are removed: such a run
    is started again in its own folder by ``--ckpt_path auto``."""
    from .checkpoints import TMP_PREFIX, remove_stale_temp_files

    folder = run / "checkpoints"
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if not entries or not all(p.name.startswith(TMP_PREFIX) for p in entries):
        return False
    remove_stale_temp_files(folder)
    if any(folder.iterdir()):
        return False  # a write in progress: a live run
    folder.rmdir()
    return True


def remove_failed_run(folder: Path) -> bool:
    """Remove ``folder`` (a run folder this process created) if it holds no checkpoint."""
    if not folder.is_dir() or any(folder.rglob("*.ckpt")):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
