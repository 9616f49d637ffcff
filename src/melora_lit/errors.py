"""How melora-lit reports a failure: one ``melora-lit: error: ...`` line that names the bad
value and what would be valid (the catalogue is docs/errors.md).

One home for what every part of the package needs to say so: the first line of an exception
(:func:`describe`), its real cause behind library wrappers (:func:`root_cause`,
:func:`data_file_error`), the offline hint (:func:`offline_hint`), argparse parsers that raise
instead of printing usage (:class:`OneLineArgumentParser`), jsonargparse's reports as one line
(:func:`parser_message`), writability checks that run before the work (:func:`check_writable`),
and the mapping of an exception to the line and exit status (:func:`error_exit`).

Imports only the standard library (and yaml, lazily), so any module may use it.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import errno
import json
import os
import pydoc
import re
import tempfile
import types
from pathlib import Path

__all__ = [
    "EXIT_ENVIRONMENT", "EXIT_INTERRUPTED", "EXIT_PEER_LOST", "EXIT_PREEMPTED", "EXIT_USAGE", "ModelSourceError",
    "OneLineArgumentParser", "check_config_files", "check_utf8",
    "check_writable", "data_file_error", "describe", "error_exit", "first_line", "hub_offline",
    "not_found", "offline_hint", "parser_message", "root_cause",
]

EXIT_USAGE = 2
"""Exit status of a bad input: an argument, config, data file, model path, checkpoint or output path."""
EXIT_ENVIRONMENT = 74
"""Exit status of a fault of the machine, not of the input: the disk is full, a size or quota limit
is reached, an I/O error (``EX_IOERR`` of sysexits.h). Earlier checkpoints are kept; rerunning with
``--ckpt_path last`` after freeing space resumes."""
EXIT_PREEMPTED = 3
"""Exit status of a command stopped by SIGTERM/SIGUSR1: ``fit`` after saving its ``last``
checkpoint, the other commands with nothing written; not 0, so that a scheduler does not take
the unfinished command for a finished one."""
EXIT_INTERRUPTED = 130
"""Exit status after a SIGINT (Ctrl+C): 128 + 2, as shells report a command ended by it."""
EXIT_PEER_LOST = 75
"""Exit status of a process of a multi-process run whose peer went away (a node lost, a rank
killed): a collective failed or timed out (``EX_TEMPFAIL`` of sysexits.h: try again). Its last
checkpoint is kept; restarting the whole job with ``--ckpt_path auto`` resumes."""
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
_WRITE_ERRNOS = {errno.EPERM, errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                 *_ENVIRONMENT_ERRNOS}

# Exceptions that only say "something failed below": the message is their cause's.
_WRAPPERS = {"DatasetGenerationError"}


class ModelSourceError(ValueError):
    """A model source that names nothing loadable: a missing local path, or a hub name that is
    not in the cache while offline. Callers that know another way in add it (``export``)."""


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(err).__name__ if isinstance(err, BaseException) else ""


def describe(err: BaseException) -> str:
    """``Type: first line`` of an exception, or of its real cause when it only wraps one."""
    cause = root_cause(err)
    return f"{type(cause).__name__}: {first_line(cause)}" if str(cause).strip() else type(cause).__name__


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def root_cause(err: BaseException) -> BaseException:
    """The exception that says what went wrong: the first one in the ``__cause__``/``__context__``
    chain that is not a generic wrapper (``datasets``' "An error occurred while generating the
    dataset"). Deeper ones are usually a library's retry of the same failure, less precise."""
    for e in _chain(err):
        if type(e).__name__ not in _WRAPPERS:
            return e
    return err


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (the hub is not asked)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def offline_hint(err: BaseException | None = None) -> str:
    """`` (HF_HUB_OFFLINE is set: ...)`` when a load failed (an ``OSError``) with the hub off."""
    if hub_offline() and (err is None or isinstance(err, OSError)):
        return " (HF_HUB_OFFLINE is set: pass a local model directory instead)"
    return ""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are a ``ValueError`` that ``melora-lit`` prints as one
    line (exit status 2), pointing at the subcommand's ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("melora-lit ")
        raise ValueError(f"{command}: {message} (see {self.prog} --help)")


# ---- data files -----------------------------------------------------------------------------


def _first_undecodable(path: Path, encoding: str) -> tuple[int, int, bytes] | None:
    """(line, byte column, bytes) of the first line of ``path`` that is not ``encoding`` text."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                return number, err.start + 1, raw[err.start:err.end]
    return None


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return number, f"{err.msg}{'' if err.msg.endswith(' at') else ' at'} column {err.colno}"
    return None


def check_utf8(path: str | os.PathLike) -> None:
    """Refuse (one-line ``ValueError``: :func:`data_file_error`'s ``cannot read FILE: line N ...``)
    a text data file that is not UTF-8: some readers (JSON lines) take its bytes silently."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(Path(path).expanduser(), "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise ValueError(data_file_error(path, err)) from None


def not_found(what: str, path: str | os.PathLike) -> str:
    """``WHAT not found: PATH``, saying for a relative PATH where it was looked for: the current
    folder, not the folder of the config file that gave it (paths are taken as written)."""
    if Path(path).expanduser().is_absolute():
        return f"{what} not found: {path}"
    return (f"{what} not found: {path} (a relative path is resolved against the current folder {Path.cwd()}, "
            f"not against the config file's folder: give an absolute path, or run from the folder it is relative to)")


def data_file_error(path: str | os.PathLike, err: BaseException) -> str:
    """What is wrong with a data file that could not be read, with the line where the reader's
    error says or where it can be found: ``cannot read FILE: line N ...``."""
    cause = root_cause(err)
    file = Path(path).expanduser()
    if isinstance(cause, UnicodeDecodeError) and file.is_file():
        found = _first_undecodable(file, cause.encoding)
        if found is not None:
            line, column, raw = found
            return (f"cannot read {path}: line {line}, column {column} is not {cause.encoding} text "
                    f"(byte 0x{raw[:1].hex()}); save the file as UTF-8")
    if file.suffix.lower() in (".jsonl", ".json") and file.is_file() and "JSON" in str(cause) + type(cause).__name__:
        found_json = _first_bad_json_line(file)
        if found_json is not None and file.suffix.lower() == ".jsonl":
            return f"cannot read {path}: line {found_json[0]} is not a JSON record ({found_json[1]})"
    return f"cannot read {path}: {describe(cause)}"


# ---- writable outputs -----------------------------------------------------------------------


def check_writable(path: str | os.PathLike, what: str, is_file: bool = False) -> None:
    """Raise a one-line ``ValueError`` unless ``path`` (a folder, or a file with ``is_file``) can be
    created or written, before any work is done. Creates nothing that stays: it makes and removes
    a probe file in the nearest existing folder (permission bits say nothing for root, and a
    read-only mount or a full quota only shows when writing)."""
    target = Path(path).expanduser()
    if is_file and target.exists() and not target.is_file():
        kind = "a folder" if target.is_dir() else "not a regular file"
        raise ValueError(f"{what} {path} is {kind}; give the path of a file to write")
    folder = target.parent if is_file else target
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".melora-lit-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable: {err.strerror or first_line(err)} "
                         f"(in {existing})") from None


def check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` file that is not valid YAML with its name, line and column
    (jsonargparse's report names neither the file nor, in one line, the place)."""
    import yaml

    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            continue  # jsonargparse says so
        try:
            yaml.safe_load(file.read_text())
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = err.problem or err.context or "invalid YAML"
            context = f" ({err.context})" if err.context and err.problem else ""
            raise ValueError(f"config {path}: YAML syntax error{where}: {problem}{context}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config {path} is not valid YAML: {first_line(err)}") from None


# ---- jsonargparse's reports ---------------------------------------------------------------

_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def error_line(text: str) -> str:
    """The line of an error message that says what is wrong: the first, except for
    jsonargparse's union report, whose first line says only that no type fitted."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Does not validate against any of the"):
        reasons = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        if reasons:
            return re.sub(r"^config: ", "", reasons[0])
    return lines[0]


def parser_message(message: str) -> str:
    """jsonargparse's (multi-line) report on a bad argument as one line:
    ``KEY=VALUE is not valid; use ...`` where it names a key, else its first line."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    head = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0])
    if head is None:
        return lines[0]
    key, rest = head.groups()
    text = "\n".join([rest, *lines[1:]])
    # a subclass's own argument (--data.init_args.task) is reported inside its class_path's
    # report: named as typed, not as the subclass option (data)
    sub = re.search(r"Problem with given class_path '([^']*)':\s*Parser key \"([^\"]+)\"", text)
    if sub is not None and not dataclasses.is_dataclass(pydoc.locate(sub.group(1))):  # a dataclass has no init_args
        key = f"{key}.init_args.{sub.group(2)}"
    else:
        sub = None
    # A union (e.g. a dataclass or None) reports its member's error under a nested key: the
    # innermost key and its expected type say what is wrong (model.melora.r, not model.melora).
    nested = re.search(r'Parser key "([^"]+)":\s*\n?\s*Expected a <class \'(\w+)\'>\. Got value: (.*)', text)
    if nested is not None:
        inner, type_name, value = nested.groups()
        wanted = _TYPE_WORDS.get(type_name, f"a {type_name}")
        return f"{key if sub is not None else f'{key}.{inner}'}={value.strip()} is not valid; use {wanted}"
    given = re.search(r"(?:Given|Got) value:\s*(.*)", text)
    # the allowed names, from the Literal types jsonargparse tried
    choices: list[str] = []
    for inner in re.findall(r"Expected a typing\.Literal\[(.*?)\](?:\.|$)", text, flags=re.M):
        choices += [c for c in (x.strip().strip("'") for x in inner.split(",")) if c and c not in choices]
    if given is not None:
        plain = re.search(r"Expected a <class '(\w+)'>", text)
        if choices:
            hint = f"; use one of {', '.join(choices)}"
        elif plain is not None and plain.group(1) in _TYPE_WORDS:
            hint = f"; use {_TYPE_WORDS[plain.group(1)]}"
        else:
            hint = f": {(rest or lines[1]).split('. Got')[0]}"
        return f"{key}={given.group(1).strip()!r} is not valid{hint}"
    return f"{key}: {error_line(text)}"


# ---- the exit line --------------------------------------------------------------------------


def _path_of(err: OSError) -> str | None:
    """The file an OSError is about: its ``filename``, else the path the failing write was given
    (a write into a full disk raises without one), from the traceback's innermost frames."""
    if err.filename:
        return str(err.filename)
    tb: types.TracebackType | None = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in ("filepath", "filename", "path"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                return str(value)
    return None


def error_exit(err: BaseException, after_fault: str = "earlier checkpoints are kept: free space and rerun with "
               "--ckpt_path last") -> tuple[str, int]:
    """The one line (after ``melora-lit: error: ``) and the exit status for an exception that
    ends a run: :data:`EXIT_ENVIRONMENT` for a full disk and I/O faults (then ``after_fault``: what
    is left and what to do; ``fit``'s by default), else :data:`EXIT_USAGE`."""
    if isinstance(err, OSError) and err.errno is not None:
        path = _path_of(err)
        cause = err.strerror or first_line(err)
        code = errno.errorcode.get(err.errno or 0)
        verb = "cannot write" if err.errno in _WRITE_ERRNOS else "cannot access"
        where = f"{verb} {path}" if path else f"{verb} a file"
        if err.errno in _ENVIRONMENT_ERRNOS:
            return f"{where}: {cause} [{code}] (disk full or a size limit reached); {after_fault}", EXIT_ENVIRONMENT
        if err.errno == errno.ENOTDIR and path:
            blocking = next((p for p in Path(path).parents if p.is_file()), None)
            if blocking is not None:
                return f"{where}: {blocking} is a file, not a folder", EXIT_USAGE
        return f"{where}: {cause}" + (f" [{code}]" if code else ""), EXIT_USAGE
    return error_line(str(err)) or type(err).__name__, EXIT_USAGE
