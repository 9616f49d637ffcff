"""What every command's outputs obey: an existing output is never replaced without
``--overwrite`` (the same flag and meaning everywhere), an output's format follows its file
extension, and a file is written whole or not at all.

* :func:`check_output`: the refusal, before any work: an existing file, or a non-empty folder,
  without ``overwrite``; an extension the writer does not know; a path that cannot be written.
* :func:`staged`: write to a temporary sibling and rename it into place when complete; a killed
  or failed write leaves no partial file that looks complete (the sibling is removed on an error,
  and its name, ``.NAME.melora-tmp-PID``, says what it is). The file is created with ``open``, so
  it gets the permissions a plain write under the user's umask gives.

Imports only the standard library and :mod:`melora_lit.errors`, so any module may use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import check_writable

__all__ = ["check_output", "process_alive", "remove_stale", "staged"]

TMP_MARK = ".melora-tmp-"


def check_output(path: str | os.PathLike, option: str, overwrite: bool, *, folder: bool = False,
                 suffixes: Sequence[str] = (), overwrite_option: str = "--overwrite") -> None:
    """Refuse (one-line ``ValueError``) to write the output ``path`` (given as ``option``) when it
    exists (a file; a non-empty folder with ``folder``) and ``overwrite`` is off, when its
    extension is not one of ``suffixes``, or when it cannot be written."""
    target = Path(path).expanduser()
    if not folder and target.exists() and not target.is_file():
        check_writable(target, option, is_file=True)  # a folder or a device: says which
    if suffixes and not folder and target.suffix.lower() not in suffixes:
        raise ValueError(f"{option}={path!s} has the extension {target.suffix or '(none)'!r}; the format follows "
                         f"the extension: use one of {', '.join(suffixes)}")
    if folder:
        if target.exists() and not target.is_dir():
            raise ValueError(f"{option}={path!s} is a file; give a folder")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ValueError(f"{option}={path!s} is not empty; pass {overwrite_option} to write into it")
    elif target.exists() and not overwrite:  # a file (anything else was refused above)
        raise ValueError(f"{option}={path!s} exists; pass {overwrite_option} to replace it")
    check_writable(target, option, is_file=not folder)


@contextmanager
def staged(path: str | os.PathLike, mode: str = "w", tmp: Path | None = None, **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` for writing, through a temporary sibling (``tmp``, by default
    ``.NAME.melora-tmp-PID``) renamed over ``path`` once the block ends without an error
    (``os.replace``: atomic on one filesystem)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp if tmp is not None else final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale(folder: str | os.PathLike) -> None:
    """Remove what killed writes of :func:`staged` left in ``folder``: temporary siblings whose
    process is gone."""
    for tmp in Path(folder).glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether another process ``pid`` runs on this host (this process's own writes, left by an
    earlier process of the same pid, count as dead: it is only starting)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
