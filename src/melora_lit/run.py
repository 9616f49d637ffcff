"""The one owner of runs and outputs: every ``melora-lit`` command asks this module where its run
folder is, how an output is written, and what a signal or a failure makes of the command.

* **Outputs** (every command): :func:`check_output` refuses, before any work, an existing output
  without ``--overwrite`` (the same flag and meaning everywhere), an extension the writer does
  not know, a path that cannot be written, and (:func:`check_protected`) one that is, lies inside
  or would replace an input of the command, a checkpoint or another run's folder; :func:`check_name`
  a name from a config that would leave its folder. :func:`staged` writes a file, :func:`staged_folder`
  a folder, whole or not at all: to a temporary sibling (:func:`temp_sibling`), flushed, renamed
  into place; a killed write leaves only that sibling, which the next run removes
  (:func:`remove_stale_temp_files`). Staged outputs get the permissions a plain write under the
  user's umask gives; a full disk while writing one is an ``OSError`` naming it (exit status 74).
* **Run folders** (``fit``, ``validate``, ``test``, ``predict``): each run gets its own
  ``version_N``, made atomically (:func:`allocate_version`); ``--ckpt_path last``/``auto`` find
  the newest run's ``last*.ckpt`` (:func:`find_last`); :func:`choose_run_folder` is the whole
  decision for a parsed command; a run that fails before its first checkpoint removes the folder
  it made (:func:`remove_new_run_folders`); a resume of a run that has nothing left to train is
  told apart (:func:`finished_run`).
* **Signals**: :data:`preemption`, the process-wide policy (SIGTERM/SIGUSR1 stop a command at
  the next safe point: ``fit`` after a resumable save, the others with nothing written; a signal
  during start-up stops the command before it starts); :class:`StopOnSignal` for ``validate``,
  ``test`` and ``predict``; :func:`worker_init` for DataLoader workers, which ignore the signals
  a scheduler sends to the whole process group (the main process decides); under SLURM a stop
  for SIGUSR1 requeues the job after the save (:func:`requeue_slurm_job`; Lightning's own requeue
  is off: :func:`cluster_plugins`).
* **Exit statuses**: :func:`run_command` turns what a command raised into one
  ``melora-lit: error:`` line and the status (the values live in :mod:`melora_lit.errors`), a
  collective that failed because another process went away too (:func:`lost_peer`: status 75);
  under ``melora-lit launch`` (:mod:`melora_lit.launch`) a node ends with its workers' status
  (:func:`job_status`), after passing the :data:`FORWARDED_SIGNALS` on to them.

Imports nothing from :mod:`melora_lit.training` (which uses it), so every layer may ask it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import (EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, check_writable, error_exit,
                     first_line)

__all__ = [
    "LAST", "LAST_OR_NEW", "PREDICTION_SUFFIXES", "RunChoice", "TMP_PREFIX", "allocate_version", "check_name",
    "check_output", "check_protected", "check_run_outputs", "choose_run_folder", "cluster_plugins", "command_inputs",
    "died_in_first_write", "find_last", "finished_run", "is_run_folder", "preemption", "process_alive",
    "remove_failed_run", "remove_new_run_folders", "remove_stale_temp_files", "requeue_slurm_job", "run_command",
    "staged", "staged_folder", "temp_sibling", "version_of",
    "WorkerInit", "worker_init", "FORWARDED_SIGNALS", "STOP_TIMEOUT_S", "job_status", "lost_peer", "stop_status",
]

# ============================================================================= outputs
#: Prefix of a file being written (a checkpoint, a prediction file, a report): then host, process
#: id and a random part, so that a stale one (its process gone) can be told from one being
#: written. No "last" in it: Lightning's own search for ``last`` checkpoints must not see it.
TMP_PREFIX = ".melora-tmp-"
_TMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}(.+)-(\d+)-[0-9a-f]+")


def check_output(path: str | os.PathLike, option: str, overwrite: bool, *, folder: bool = False,
                 suffixes: Sequence[str] = (), overwrite_option: str = "--overwrite",
                 inputs: Sequence[tuple[str, Any]] = (), current: str | os.PathLike | None = None) -> None:
    """Refuse (one-line ``ValueError``) to write the output ``path`` (given as ``option``) where
    :func:`check_protected` refuses it (``inputs`` and ``current`` go to it; a ``folder`` output
    is replaced whole, so with ``overwrite`` it must not hold them either), when it exists (a file;
    a non-empty folder with ``folder``) and ``overwrite`` is off, when its extension is not one of
    ``suffixes``, or when it cannot be written."""
    target = Path(path).expanduser()
    check_protected(path, option, inputs, current, replaced=folder and overwrite)
    if not folder and target.exists() and not target.is_file():
        check_writable(target, option, is_file=True)  # a folder or a device: says which
    if suffixes and not folder and target.suffix.lower() not in suffixes:
        raise ValueError(f"{option}={path!s} has the extension {target.suffix or '(none)'!r}; the format follows "
                         f"the extension: use one of {', '.join(suffixes)}")
    if folder:
        if target.exists() and not target.is_dir():
            raise ValueError(f"{option}={path!s} is a file; give a folder")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ValueError(f"{option}={path!s} is not empty; pass {overwrite_option} to replace it")
    elif target.exists() and not overwrite:  # a file (anything else was refused above)
        raise ValueError(f"{option}={path!s} exists; pass {overwrite_option} to replace it")
    check_writable(target, option, is_file=not folder)


def check_protected(path: str | os.PathLike, option: str, inputs: Sequence[tuple[str, Any]] = (),
                    current: str | os.PathLike | None = None, *, replaced: bool = False) -> None:
    """Refuse (one-line ``ValueError``) an output ``path`` (given as ``option``) that is or lies
    inside one of the command's ``inputs`` (``(option, path)`` pairs: data files and folders, the
    checkpoint, the model folder), a checkpoint (``*.ckpt``, or a ``checkpoints`` folder holding
    them), or the folder of a run other than ``current`` (:func:`is_run_folder`); with ``replaced``
    (a folder that ``--overwrite`` replaces whole) also one that holds any of them."""
    target = _real(path)
    given = [(opt, p, _real(p)) for opt, p in inputs
             if isinstance(p, (str, os.PathLike)) and str(p) and Path(p).expanduser().exists()]
    own = _real(current) if current is not None else None
    found = next((f"is the input {opt}" if target == where else f"lies inside the input {opt} ({p})"
                  for opt, p, where in given if target == where or where in target.parents), None)
    for folder in (target, *target.parents) if found is None else ():
        what = _protected_kind(folder, own)
        if what is not None:
            found = f"is {what}" if folder == target else f"lies inside {what} {folder}"
            break
    if found is None and replaced and target.is_dir():
        found = next((f"holds the input {opt} ({p})" for opt, p, where in given if target in where.parents), None)
        inside = (Path(root, entry) for root, dirs, files in os.walk(target) for entry in (*dirs, *files))
        found = found or next((f"holds {what} {entry}" for entry in inside
                               if (what := _protected_kind(entry, own)) is not None), None)
    if found is not None:
        raise ValueError(f"{option}={path!s} {found}; outputs never go into inputs, checkpoints or other runs' "
                         f"folders: write it elsewhere")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run's: a logger's ``version_N``, or one holding ``hparams.yaml`` or
    ``checkpoints/*.ckpt`` (a run without a logger)."""
    return folder.is_dir() and (_VERSION.fullmatch(folder.name) is not None or (folder / "hparams.yaml").is_file()
                                or any((folder / "checkpoints").glob("*.ckpt")))


def _protected_kind(path: Path, current: Path | None) -> str | None:
    if path.name.endswith(".ckpt") and path.exists():
        return "the checkpoint"
    if path.name == "checkpoints" and path.is_dir() and any(path.glob("*.ckpt")):
        return "the checkpoint folder"
    if path != current and is_run_folder(path):
        return "another run's folder"
    return None


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_name(name: str | None, option: str, folder: str) -> None:
    """Refuse (one-line ``ValueError``) a file name taken from a config (``option``) that would
    place the file outside ``folder``, the folder it belongs to: an absolute path or a ``..`` part."""
    if name is not None and (os.path.isabs(name) or ".." in Path(name).parts):
        raise ValueError(f"{option}={name!r} would place a file outside {folder}; give a name without '..' parts "
                         f"or a leading '/' (e.g. '{{epoch}}-{{step}}')")


def temp_sibling(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place (same folder, same filesystem)."""
    return final.with_name(f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def staged(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, through :func:`temp_sibling`, renamed over ``path`` once
    the block ends without an error (``os.replace``: atomic on one filesystem), then the folder
    entry made durable. On an error the sibling is removed and ``path`` is as it was."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_machine_fault(err, final)
        raise
    _sync_folder(final.parent)


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder output, whole or absent: the block writes into a temporary sibling folder
    (:func:`temp_sibling`), renamed into place once the block ends without an error, replacing a
    folder there (its caller checked ``--overwrite``). Before the rename every file and folder in
    it gets the permissions a plain write under the umask gives (libraries write some files 0600)
    and its data is flushed to disk. On an error the temporary folder is removed, ``path`` is as
    it was, and a full disk a library reported only in its message (safetensors: "File too large
    (os error 27)") is the ``OSError`` it is."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    os.mkdir(tmp)
    try:
        yield tmp
        _settle(tmp)
        _publish(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_machine_fault(err, final)
        raise
    _sync_folder(final.parent)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``; a non-empty folder there (which a rename
    cannot replace) is first renamed aside to a temp sibling and removed after."""
    old = temp_sibling(final) if final.is_dir() and not final.is_symlink() and any(final.iterdir()) else None
    if old is not None:
        os.rename(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _settle(folder: Path) -> None:
    mask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _umask() -> int:
    try:  # read, not set: os.umask would change it for every thread for a moment
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _sync_folder(folder: Path) -> None:
    try:  # the rename itself is durable once the folder entry is
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) print an OS error
_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _raise_machine_fault(err: BaseException, final: Path) -> None:
    """A full disk (or size limit, quota, I/O error) while writing ``final``, as the ``OSError``
    that names ``final`` (the temp file's name would mean nothing to the user)."""
    if isinstance(err, OSError):
        if err.errno in _FAULTS and not err.filename:
            err.filename = str(final)
        return
    found = _OS_ERROR.search(str(err))
    if found and int(found.group(1)) in _FAULTS:
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(final)) from err


def remove_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove what killed writes of :func:`staged` and :func:`staged_folder` left in ``folder``:
    temporary siblings of this host whose process is gone. A write in progress (another process)
    is left alone."""
    host = socket.gethostname()
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*"):
        found = _TMP_NAME.fullmatch(tmp.name)
        if found and (found.group(1) != host or process_alive(int(found.group(2)))):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
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


# ============================================================================= run folders
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
    (``os.mkdir`` fails on an existing folder: then the next N), so that two runs started at the
    same time, on one machine or on several nodes of a shared filesystem, never share a folder;
    returns N."""
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


#: Run folders this process created, each with the folders made to hold it, innermost first
#: (removed again if the command fails before its first checkpoint).
_NEW_RUN_FOLDERS: list[tuple[Path, list[Path]]] = []


def remove_new_run_folders() -> None:
    """After a failed command: remove what it made, and only if it saved nothing (the folders
    made to hold a run too, where that leaves them empty: a refused command creates nothing)."""
    for folder, made in _NEW_RUN_FOLDERS:
        if remove_failed_run(folder):
            for parent in made:
                try:
                    parent.rmdir()
                except OSError:  # another run's, or not empty
                    break
    _NEW_RUN_FOLDERS.clear()


_RUN_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # the loggers that write version_N run folders
_OTHER_LOGGERS: list = []  # marker: loggers of other kinds only (W&B, MLflow, ...)


@dataclass
class RunChoice:
    """What :func:`choose_run_folder` decided: the checkpoint to resume (``ckpt_path`` is set on
    the config), the logger version that names the run folder (None: the logger's own choice),
    and the config values to put back after instantiation (``config.yaml`` must not pin a version)."""

    version: int | str | None = None
    restore: list[tuple[Any, str, Any]] = field(default_factory=list)
    #: the run's loggers are all of other kinds (W&B, MLflow, ...): a CSVLogger of ``version``
    #: under ``root/lightning_logs`` goes first, so that the run still has its folder
    run_folder_logger: bool = False


def choose_run_folder(cfg: Any, subcommand: str | None, read_checkpoint: Callable[[Path], Any],
                      is_global_zero: bool = True) -> RunChoice:
    """The run folder of a parsed command (``cfg``: its jsonargparse namespace), before anything
    is built or written: the newest run's for ``--ckpt_path last``/``auto`` (``fit``; its file is
    read with ``read_checkpoint``, so an unreadable one is refused now, never an older run taken),
    else a new ``version_N`` made atomically by global rank 0 (the other ranks learn it from
    Lightning's broadcast). ``cfg.ckpt_path`` is set to the file found; ``cfg.checkpoint.dirpath``
    to the resumed run's checkpoints when there is no logger."""
    choice = RunChoice()
    if cfg is None or cfg.get("trainer") is None:
        return choice
    check_run_outputs(cfg, subcommand)
    trainer = cfg.trainer
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    specs = _logger_specs(trainer.get("logger"))
    if specs is _OTHER_LOGGERS:  # W&B, MLflow, ...: the run's folder comes from a CSVLogger beside them
        specs, choice.run_folder_logger = [], True
    log_root = _log_root(specs, root)
    dirpath = cfg.get("checkpoint", {}).get("dirpath")
    ckpt = cfg.get("ckpt_path")
    found = dead = None
    if ckpt in (LAST, LAST_OR_NEW):
        found, dead = find_last(Path(dirpath) if dirpath else None, log_root or root / "lightning_logs",
                                root / "checkpoints")
        where = dirpath or log_root or root
        if found is None and ckpt == LAST_OR_NEW and subcommand != "fit":
            raise ValueError(f"--ckpt_path auto: no run under {where} has a last checkpoint (last*.ckpt), and "
                             f"{subcommand} needs a trained model, not a new one: give --ckpt_path FILE, "
                             f"or the run's --trainer.default_root_dir")
        if found is None and ckpt == LAST:
            why = (f"the newest run {dead} was killed in its first checkpoint write (its temp file is removed)"
                   if dead is not None else f"no run under {where} has a last checkpoint (last*.ckpt)")
            raise ValueError(f"--ckpt_path last: {why}; nothing to resume: start a new run without --ckpt_path, "
                             f"or use --ckpt_path auto (resume if there is a checkpoint, else start)")
        if found is not None:
            read_checkpoint(found)  # the newest run's: if unreadable, say so (never an older run)
            if is_global_zero:
                print(f"melora-lit: resuming from {found}", file=sys.stderr)
        cfg.ckpt_path = str(found) if found is not None else None
    resumed_run = found.parent.parent if found is not None and subcommand == "fit" else None
    if specs is None:  # no logger: a resumed run keeps writing its checkpoints where they are
        if resumed_run is not None and not dirpath:
            cfg.checkpoint.dirpath = str(found.parent)
        return choice
    if any((s.get("init_args") or {}).get("version") is not None for s in specs):
        return choice  # the user chose the folder
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if dead is not None and subcommand == "fit" and log_root is not None and dead.parent == log_root:
        version: int | str | None = version_of(dead)  # started again in its own folder
    elif resumed_run is not None and log_root is not None and resumed_run.parent == log_root:
        version = version_of(resumed_run)
    elif not specs and SLURMEnvironment.detect() and SLURMEnvironment.job_id() is not None:
        version = SLURMEnvironment.job_id()  # Lightning's default: a requeued job keeps its folder
    elif is_global_zero and log_root is not None:
        made = list(itertools.takewhile(lambda p: not p.exists(), (log_root, *log_root.parents)))
        version = allocate_version(log_root)
        _NEW_RUN_FOLDERS.append((log_root / f"version_{version}", made))
    else:
        # the other processes: only global rank 0 writes into the run folder, and Lightning's
        # ModelCheckpoint takes its folder from rank 0 (a broadcast)
        return choice
    choice.version = version
    for spec in specs:
        choice.restore.append((spec.init_args, "version", spec.init_args.get("version")))
        spec.init_args.version = version
    return choice


#: The formats of a predictions file, by extension.
PREDICTION_SUFFIXES = (".csv", ".jsonl")


def check_run_outputs(cfg: Any, subcommand: str | None) -> None:
    """What a parsed ``fit``/``validate``/``test``/``predict`` will write, checked before the model
    or the data is read: the checkpoint ``filename`` template stays in its folder (:func:`check_name`),
    and ``predict``'s files (:func:`check_output`, with the command's inputs): the predictions file,
    and the GLUE submission folder where a test split is predicted (``predict_split: test``)."""
    check_name(_get(cfg, "checkpoint", "filename"), "checkpoint.filename", "the run's checkpoint folder")
    output = _get(cfg, "prediction_writer", "output_file")
    if subcommand != "predict" or not output:
        return  # the default predictions file goes into the new run's folder
    overwrite, flag = bool(_get(cfg, "prediction_writer", "overwrite")), "--overwrite"
    inputs = command_inputs(cfg)
    check_output(output, "prediction_writer.output_file", overwrite, suffixes=PREDICTION_SUFFIXES,
                 overwrite_option=flag, inputs=inputs)
    if (_get(cfg, "data", "init_args") or {}).get("predict_split") == "test":
        folder = _get(cfg, "prediction_writer", "submission_dir") or Path(output).parent / "glue_submission"
        check_output(folder, "prediction_writer.submission_dir", overwrite, folder=True, overwrite_option=flag,
                     inputs=inputs)


def command_inputs(cfg: Any) -> list[tuple[str, Any]]:
    """What a parsed ``fit``/``validate``/``test``/``predict`` reads, as ``(option, path)``: the
    checkpoint, the model source and the data module's files and folders (``*_file``, ``*_files``,
    ``*_dir`` but its cache, a local ``dataset_name``)."""
    found = [("--ckpt_path", cfg.get("ckpt_path")),
             ("--model.model_name_or_path", _get(cfg, "model", "model_name_or_path"))]
    args = _get(cfg, "data", "init_args")
    for key, value in args.items() if hasattr(args, "items") else ():
        name = key.rsplit(".", 1)[-1]
        if name.endswith(("_file", "_files", "_dir")) and name != "cache_dir" or name == "dataset_name":
            found += [(f"--data.init_args.{key}", v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return found


def _get(cfg: Any, section: str, key: str) -> Any:
    part = cfg.get(section)
    return part.get(key) if part is not None and hasattr(part, "get") else None


def _logger_specs(logger: Any) -> list | None:
    """The config entries of the loggers that write run folders: None without a logger, [] for
    Lightning's default logger, :data:`_OTHER_LOGGERS` when only loggers of other kinds."""
    if logger is False:
        return None
    if logger is None or logger is True:
        return []
    entries = logger if isinstance(logger, list) else [logger]
    specs = [e for e in entries if str(getattr(e, "class_path", "")).rsplit(".", 1)[-1] in _RUN_LOGGERS]
    return specs if specs or not entries else _OTHER_LOGGERS


def _log_root(specs: list | None, root: Path) -> Path | None:
    """``save_dir/name`` of the first run-folder logger (Lightning's default: root/lightning_logs)."""
    if specs is None:
        return None
    if not specs:
        return root / "lightning_logs"
    args = specs[0].init_args
    return Path(args.get("save_dir") or root) / (args.get("name") or "")


# ============================================================================= signals
def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop_exception() -> type[BaseException]:
    # Lightning's own (a SystemExit): its loops end on it as on their own SIGTERM
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return SIGTERMException


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class Preemption:
    """The process-wide policy for SIGTERM, SIGUSR1 (a scheduler's "stop now") and SIGINT.

    * From :meth:`install` (the first thing a command does) until a loop watches: a stop signal
      is recorded (:attr:`early`) and the command stops at its first safe point, before any step
      or batch (:meth:`stop_before_start`); a command without a trainer (``export``, ``evaluate``,
      ``report``) stops where it is, removing what it was writing (``raise_on_signal``).
    * While a loop runs (:meth:`watch`, from the trainer's callbacks): the signal is recorded
      (:attr:`signal`) and the loop stops after the current step or batch (``fit`` saves first).
    * Once the command is stopping, more signals change nothing (:meth:`exiting`).
    """

    def __init__(self) -> None:
        self.is_stopping = False
        self.interrupted = False  # a SIGINT (KeyboardInterrupt) ended the run: exit 130
        self.raise_on_signal = False
        self.received: str | None = None  # the signal that stopped a command without a trainer
        self.early: str | None = None  # a stop signal before any loop watched
        self.signal: str | None = None  # the stop signal a loop got
        self._previous: dict[int, Any] = {}

    def install(self, raise_on_signal: bool = False) -> None:
        """Take SIGTERM and SIGUSR1 (again: :func:`melora_lit.__main__.main` installs it before the
        imports, the command once it knows what it is). ``raise_on_signal``: a command without a
        trainer stops where it is, also for a signal received before this call."""
        self.raise_on_signal = raise_on_signal
        self.is_stopping = self.interrupted = False
        self.received = self.signal = None
        if in_main_thread():
            for signum in _STOP_SIGNALS:
                signal.signal(signum, self._on_signal)
        if raise_on_signal and self.early:
            self.is_stopping = True
            self.received = self.early
            raise _stop_exception()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.is_stopping or signal.getsignal(signum) != self._on_signal:
            return  # stopping already, or called by Lightning's handler, which stops the run
        name = signal.Signals(signum).name
        if self.raise_on_signal:
            self.is_stopping = True
            self.received = name
            raise _stop_exception()
        self.early = self.early or name

    def stop_before_start(self, what: str, trainer: Any) -> None:
        """At a loop's start (every rank): a stop signal received during start-up (imports, model
        and data loading, on any rank) stops the command here, before its first step or batch,
        with nothing trained or written."""
        name = self.early or ("SIGTERM" if getattr(trainer, "received_sigterm", False) else None)
        if not trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            return
        self.is_stopping = True
        if trainer.is_global_zero:
            print(f"melora-lit: received {name or 'a stop signal'} while starting: {what} stopped before its first "
                  f"step, nothing trained or written (exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        raise _stop_exception()

    def watch(self, *, term: bool) -> None:
        """While a loop runs: SIGUSR1 (and, with ``term``, SIGTERM; else Lightning's handler marks
        ``trainer.received_sigterm``) only records the request, which the loop's callback acts on
        at the next step or batch end. (Lightning's own SLURM SIGUSR1 handler is off:
        :func:`cluster_plugins`; melora-lit requeues after its save, :func:`requeue_slurm_job`.)"""
        self.signal = None
        if not in_main_thread():
            return
        if hasattr(signal, "SIGUSR1"):
            self._previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "signal", self.signal or "SIGUSR1"))
        if term:
            # Lightning's SIGTERM handler broadcasts from inside the handler, on whichever rank got
            # the signal: unmatched by the other ranks, that collective hangs a multi-process job
            self._previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "signal", self.signal or "SIGTERM"))

    def unwatch(self) -> None:
        """The loop ended: the handlers before :meth:`watch` are back (a repeated SIGUSR1 during
        a stop's shutdown stays ignored: it must not end the process)."""
        if not in_main_thread():
            return
        for signum, previous in self._previous.items():
            stopped = self.signal is not None and signum == getattr(signal, "SIGUSR1", None)
            signal.signal(signum, signal.SIG_IGN if stopped else previous)
        self._previous.clear()

    def requested(self, trainer: Any) -> str | None:
        """The stop signal a loop got (Lightning records a SIGTERM it handled itself)."""
        return self.signal or ("SIGTERM" if getattr(trainer, "received_sigterm", False) else None)

    def stopping(self) -> None:
        self.is_stopping = True

    def exiting(self) -> None:
        """The command stopped for a signal and the process exits now: ignore more of them at the
        OS level (Python's shutdown resets a Python handler to the default, which would end the
        process by SIGTERM, status 143, instead of :data:`EXIT_PREEMPTED`)."""
        self.is_stopping = True
        if in_main_thread():
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)


preemption = Preemption()


def cluster_plugins(plugins: Any) -> Any:
    """The trainer's ``plugins``, under SLURM with Lightning's SLURM requeue off
    (``SLURMEnvironment(auto_requeue=False)``, added where no cluster environment is given; one
    that is given is set so): its SIGUSR1 handler would write an ``hpc_ckpt_N.ckpt`` beside the
    run's ``last.ckpt`` and requeue before melora-lit's own save. :func:`requeue_slurm_job` does it after."""
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment

    given = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
    for plugin in given:
        if isinstance(plugin, SLURMEnvironment):
            plugin.auto_requeue = False
    if any(isinstance(p, ClusterEnvironment) for p in given) or TorchElasticEnvironment.detect() \
            or not SLURMEnvironment.detect():
        return plugins  # torchrun's environment comes first inside SLURM too, as in Lightning
    return [*given, SLURMEnvironment(auto_requeue=False)]


#: How long ``scontrol requeue`` may take (slurmctld busy) within SLURM's warning time.
REQUEUE_TIMEOUT_S = 60


def requeue_slurm_job() -> None:
    """After a command stopped for SIGUSR1 under SLURM (``--signal=USR1@T``: the time limit is
    near) and saved: global rank 0 requeues the job (``scontrol requeue``; SLURM starts it again
    with the same job id, hence the same run folder, which ``--ckpt_path auto`` resumes) and says
    so in one line, or why not (no scontrol, scontrol failed); the exit status stays 3."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return  # RANK: torchrun's global rank, inside SLURM too
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "")
    command, why = f"scontrol requeue {job}", None
    scontrol = shutil.which("scontrol")
    if not re.fullmatch(r"\d+(_\d+)?", job):
        why = f"SLURM_JOB_ID={job!r} is not a job id"
    elif scontrol is None:
        why = "scontrol is not on PATH"
    else:
        import subprocess

        try:
            done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            why = None if done.returncode == 0 else \
                f"'{command}' failed with exit status {done.returncode}{': ' + said[0] if said else ''}"
        except subprocess.TimeoutExpired:
            why = f"'{command}' did not finish in {REQUEUE_TIMEOUT_S} s"
        except OSError as err:
            why = f"'{command}' could not run: {err.strerror or err}"
    if why is None:
        print(f"melora-lit: requeued SLURM job {job} ({command}): it starts again under the same job id and, run "
              f"with --ckpt_path auto, resumes from last.ckpt", file=sys.stderr, flush=True)
    else:
        print(f"melora-lit: SLURM job {job or '(none)'} was not requeued: {why}; submit it again (with --ckpt_path "
              f"auto) to resume", file=sys.stderr, flush=True)


class WorkerInit:
    """A DataLoader ``worker_init_fn`` that makes the worker ignore SIGTERM, SIGUSR1 and SIGINT,
    then runs ``then`` (a user's own ``worker_init_fn``), if any. A scheduler (SLURM) or a
    shell's Ctrl+C signals the whole process group: only the main process decides what a signal
    does (:data:`preemption`); a worker that died of it (PyTorch's workers die of a SIGTERM that
    their parent did not send) would end the run in an error instead of a save. Picklable, for
    loaders whose workers are spawned."""

    def __init__(self, then: Callable[[int], Any] | None = None) -> None:
        self.then = then
        _end_workers_at_exit()

    def __call__(self, worker_id: int) -> None:
        for signum in (*_STOP_SIGNALS, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


@functools.cache
def _end_workers_at_exit() -> None:
    import atexit
    import multiprocessing.util  # noqa: F401 - its exit handler is registered first: ours runs before it

    atexit.register(_kill_workers_at_exit)


def _kill_workers_at_exit() -> None:
    """At exit, multiprocessing ends the daemonic children that are left (DataLoader workers whose
    loader was not shut down) with SIGTERM, which they ignore (:class:`WorkerInit`), then waits
    for them: they get SIGKILL first, as PyTorch's own workers exit at once on their parent's
    SIGTERM. PyTorch's SIGCHLD handler would report that as a worker failure: the default first."""
    import multiprocessing

    if in_main_thread() and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def worker_init(then: Callable[[int], Any] | None = None) -> WorkerInit:
    """The ``worker_init_fn`` of every DataLoader of this package (:class:`WorkerInit`), around
    ``then`` (a user's own; one already wrapped is returned as it is)."""
    return then if isinstance(then, WorkerInit) else WorkerInit(then)


def _stop_on_signal_class():
    import lightning as L
    from lightning.pytorch.trainer.states import TrainerFn

    class StopOnSignal(L.Callback):
        """``validate``, ``test`` and ``predict`` stop on SIGTERM and SIGUSR1 too (Lightning's loops
        stop only ``fit``, where ``ResumableCheckpoint`` saves first): after the current batch,
        with nothing written (``PredictionWriter`` writes at the end, staged), and the command
        exits :data:`EXIT_PREEMPTED`. A SIGINT (Ctrl+C), which Lightning ends as status 1, is
        recorded so that the command exits 130, as shells expect."""

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if stage != "fit":
                preemption.stop_before_start(getattr(stage, "value", stage), trainer)
                preemption.watch(term=False)

        def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if stage != "fit":
                preemption.unwatch()

        def _check(self, trainer: L.Trainer, batch_idx: int) -> None:
            if trainer.state.fn == TrainerFn.FITTING:
                return  # fit's validation: ResumableCheckpoint's
            name = preemption.requested(trainer)
            if trainer.strategy.reduce_boolean_decision(name is not None, all=False):
                preemption.stopping()
                if trainer.is_global_zero:
                    print(f"melora-lit: received {name or 'a stop signal'}: {trainer.state.fn.value} stopped after "
                          f"batch {batch_idx + 1}, nothing written (exit status {EXIT_PREEMPTED})", file=sys.stderr,
                          flush=True)
                raise _stop_exception()

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._check(trainer, batch_idx)

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._check(trainer, batch_idx)

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._check(trainer, batch_idx)

        def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
            if isinstance(exception, KeyboardInterrupt):
                preemption.interrupted = True
            # for the lost-peer line (run_command): every rank knows the path of the last save
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
            _FAILED_RUN.update(rank=trainer.global_rank, world=trainer.world_size, stage=trainer.state.fn.value,
                               checkpoint=last if last and Path(last).is_file() else None)

    return StopOnSignal


def __getattr__(name: str) -> Any:
    if name == "StopOnSignal":  # a Lightning callback: Lightning is imported when it is asked for
        globals()[name] = cls = _stop_on_signal_class()
        return cls
    raise AttributeError(name)


# ============================================================================= exit statuses
def run_command(args: list[str], command: Callable[[], Any], debug: bool = False) -> None:
    """Run ``command`` (the parsed ``args``' work) as the ``melora-lit`` process does: a signal
    ends it with :data:`EXIT_PREEMPTED` (130 for SIGINT), a bad input or a machine fault with one
    ``melora-lit: error:`` line and its status (:func:`melora_lit.errors.error_exit`), and a
    failed run removes the run folder it made (if it saved nothing). ``debug``
    (``MELORA_LIT_DEBUG``): the traceback instead of the line."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    stop = _stop_exception()
    _NEW_RUN_FOLDERS.clear()
    _FAILED_RUN.clear()
    try:
        try:
            command()
        except BaseException:
            remove_new_run_folders()
            raise
        finally:
            # a start-up signal belongs to this command (matters in-process only)
            early, preemption.early = preemption.early, None
    except stop:
        # SIGTERM/SIGUSR1: fit saved last.ckpt and said so (docs/multinode.md); validate/test/
        # predict stopped with nothing written; a start-up signal stopped before the first step
        preemption.exiting()
        if preemption.received:  # export, evaluate, report
            print(f"melora-lit: received {preemption.received}: {args[0]} stopped before it finished, its output is "
                  f"not complete (exit status {EXIT_PREEMPTED})", file=sys.stderr)
        if (preemption.signal or preemption.received or early) == "SIGUSR1":
            requeue_slurm_job()  # last: scontrol requeue ends the job's processes
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:  # Ctrl+C outside a trainer's loop (Lightning handles it inside)
        print(f"melora-lit: interrupted (SIGINT) (exit status {EXIT_INTERRUPTED})", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exit_:
        if preemption.interrupted and exit_.code == 1:  # Lightning's exit after a KeyboardInterrupt
            sys.exit(EXIT_INTERRUPTED)
        raise
    except (ValueError, OSError, MisconfigurationException) as err:
        if debug:
            raise
        # a machine fault: fit keeps its earlier checkpoints; every other command's outputs are staged
        staged_only = "nothing is left half-written (outputs are staged): free space and rerun"
        line, status = error_exit(err) if args[:1] == ["fit"] else error_exit(err, staged_only)
        print(f"melora-lit: error: {line}", file=sys.stderr)
        sys.exit(status)
    except Exception as err:
        cause = lost_peer(err)
        if debug or cause is None:
            raise
        run = _FAILED_RUN
        who = f" (this is rank {run['rank']} of {run['world']})" if "rank" in run else ""
        stage, last = run.get("stage", (args or ["fit"])[0]), run.get("checkpoint") or "none"
        print(f"melora-lit: error: lost contact with another process of the run{who} during {stage}: {cause}; "
              f"the last checkpoint is {last}; restart the whole job with --ckpt_path auto", file=sys.stderr)
        sys.exit(EXIT_PEER_LOST)


#: What the failed run was doing, for the lost-peer line (set by StopOnSignal.on_exception).
_FAILED_RUN: dict[str, Any] = {}
_GLOO_FILLER = re.compile(r"^\[[^\]]*:\d+\]\s*|\. This is typically caused by.*$")


def lost_peer(err: BaseException) -> str | None:
    """What a collective that failed because another process of the run went away (killed, its
    node lost, or silent past the collective timeout) said, in one line; None for other errors.
    torch reports it as a ``torch.distributed.DistError`` (nccl, the TCP store, timeouts) or as
    gloo's ``RuntimeError`` (``[.../gloo/transport/tcp/pair.cc:N] Read error ...``)."""
    dist = sys.modules.get("torch.distributed")
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        text = first_line(current)
        if (dist is not None and isinstance(current, getattr(dist, "DistError", ()))) or (
                isinstance(current, RuntimeError) and "/gloo/" in text):
            return _GLOO_FILLER.sub("", text).rstrip(".")
        current = current.__cause__ or current.__context__
    return None


#: The signals that ``melora-lit launch`` passes on to its workers: each stops them as it stops
#: one ``melora-lit`` process (SIGTERM, SIGUSR1: a resumable save, then exit 3; SIGINT: 130).
FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
#: How long ``melora-lit launch`` waits, after passing a signal on, for its workers' own stop (a
#: step and a save) before it kills them (``--shutdown-timeout``).
STOP_TIMEOUT_S = 300


def stop_status(signame: str) -> int:
    """The exit status of a command stopped by ``signame`` (SIGINT: 130, else 3)."""
    return EXIT_INTERRUPTED if signame == "SIGINT" else EXIT_PREEMPTED


def job_status(statuses: Sequence[int]) -> int:
    """One exit status for the worker processes of a node (``melora-lit launch``), from theirs in
    the order they ended (a negative one: killed by that signal, reported as 128 + N as shells
    do): 3 when every worker ended 0 or 3 and one 3 (a preemption, whichever process got the
    signal); 2 when one refused its input; else the first failure's (75: a lost peer)."""
    codes = [128 - s if s < 0 else s for s in statuses]
    if all(c in (0, EXIT_PREEMPTED) for c in codes):
        return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    return next(c for c in codes if c != 0)


# ============================================================================= finished runs
def finished_run(checkpoint: dict[str, Any], max_epochs: int | None, max_steps: int) -> str | None:
    """Why a resumed run would train nothing (its checkpoint is already at this run's
    ``max_epochs`` or ``max_steps``, as Lightning's fit loop decides it), or None."""
    step = int(checkpoint.get("global_step") or 0)
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return f"it is at step {step} and --trainer.max_steps is {max_steps}"
    progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current")
    epochs = int((progress or {}).get("processed") or 0)
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        return f"it trained {epochs} epoch{'s' if epochs != 1 else ''} and --trainer.max_epochs is {max_epochs}"
    return None
