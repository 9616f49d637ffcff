"""Real ``melora-lit`` processes without paying the imports for each one.

A test that checks a process-level promise (an exit status, a signal, a SIGKILL, two processes
at once) needs a process of its own; but a fresh ``python -m melora_lit`` spends about 6
CPU-seconds importing torch, Lightning and transformers before it does anything, and the suite
starts dozens of them. Here a server process imports ``melora_lit.cli`` once (and runs no torch
op, so no thread pool exists when it forks); each command is a ``fork`` of it, with the command's
own arguments, environment, current folder, standard streams and, if asked, a session of its
own. The child is a real process: its own pid, signals delivered to it, its exit status (or the
signal that killed it) reported as ``subprocess`` reports it, children of its own (Lightning's
second DDP rank, DataLoader workers), atexit handlers and interpreter shutdown as a normal exit.

What it is not: a fresh interpreter. Environment variables read at import time by a library
(``PYTHONPATH`` aside, which is applied to ``sys.path``) keep the server's values, and
start-up itself (a signal during the imports) cannot be tested through it: those tests start
``python -m melora_lit`` (:func:`support.melora_cmd`).

Test side: :func:`popen` (a ``subprocess.Popen`` look-alike) and :func:`run` (``subprocess.run``).
"""

from __future__ import annotations

import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

_HEADER = struct.Struct("!I")


# ----------------------------------------------------------------------------- the server
#: What a run imports later, lazily (a tiny fit imports ~500 more modules after the CLI's):
#: imported by the server once, so that a child starts with them.
WARM = ("melora_lit.cli", "melora_lit.export", "melora_lit.report", "melora_lit.data", "peft", "datasets",
        "lightning.pytorch.loggers", "tensorboard.summary.writer.event_file_writer", "tensorboard.compat.proto.summary_pb2",
        "torch.utils.tensorboard", "torch.utils.cpp_extension", "scipy.io", "transformers.models.bert.modeling_bert",
        "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2")


def _serve(path: str) -> None:
    import importlib

    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a child imports it itself, and fails as a fresh process would
            pass

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(timeout=0.01):
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sel.close()
                listener.close()
                conn.close()
                _child(request, fds)  # does not return
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    size = _HEADER.unpack(head)[0]
    data = b""
    while len(data) < size:
        data += conn.recv(size - len(data))
    return json.loads(data), list(fds)


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, run it, exit as its interpreter would."""
    if request.get("new_session"):
        os.setsid()
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    for name in ("SIGTERM", "SIGUSR1", "SIGCHLD"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if request.get("file_size_limit"):
        import resource

        limit = int(request["file_size_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if request.get("umask") is not None:
        os.umask(request["umask"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # as `python -m`: the current folder first, then PYTHONPATH's entries, then the rest
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *[p for p in sys.path[1:] if p not in extra]]
    import tempfile

    tempfile.tempdir = None  # TMPDIR as the child's environment says (read again on first use)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = [request["argv0"], *request["args"]]
    from melora_lit.__main__ import main  # the console script's entry: takes the signals, then the CLI

    code: Any = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints it
        import traceback

        traceback.print_exc()
        code = 1
    # a normal interpreter exit: atexit handlers, non-daemon threads joined, streams flushed
    raise SystemExit(code)


# ----------------------------------------------------------------------------- the test side
_server: tuple[subprocess.Popen, str] | None = None
_lock = threading.Lock()


def _address() -> str:
    global _server
    with _lock:
        if _server is None or _server[0].poll() is not None:
            folder = tempfile.mkdtemp(prefix="melora-forkserver-")
            path = os.path.join(folder, "socket")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p])}
            proc = subprocess.Popen([sys.executable, "-c", f"import forkserver; forkserver._serve({path!r})"],
                                    env=env, stdout=subprocess.PIPE, text=True, cwd=folder)
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the fork server did not start (status {proc.wait()})")
            _server = (proc, path)

            def stop(proc=proc, folder=folder) -> None:
                proc.kill()
                proc.wait()
                shutil.rmtree(folder, ignore_errors=True)

            import atexit

            atexit.register(stop)
        return _server[1]


def _fd(spec: Any, default: int, mode: str) -> tuple[int, Any]:
    """(fd for the child, our end): ``subprocess.PIPE``, ``DEVNULL``, ``None``, an fd or a file."""
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (w, r) if mode == "w" else (r, w)
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None
    if spec is None:
        return os.dup(default), None
    if spec == subprocess.STDOUT:
        return -1, None
    return os.dup(spec if isinstance(spec, int) else spec.fileno()), None


class ForkedProcess:
    """What a test uses of ``subprocess.Popen``, for a command forked from the server."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None, text: bool = False,
                 start_new_session: bool = False, file_size_limit: int | None = None,
                 umask: int | None = None) -> None:
        self.args = ["melora-lit", *args]
        self.returncode: int | None = None
        child_in, ours_in = _fd(stdin, 0, "r")
        child_out, ours_out = _fd(stdout, 1, "w")
        if stderr == subprocess.STDOUT:
            child_err, ours_err = os.dup(child_out), None
        else:
            child_err, ours_err = _fd(stderr, 2, "w")
        request = {"args": list(args), "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd if cwd is not None else os.getcwd()), "new_session": start_new_session,
                   "file_size_limit": file_size_limit, "umask": umask,
                   "argv0": shutil.which("melora-lit", path=os.path.dirname(sys.executable)) or "melora-lit"}
        data = json.dumps(request).encode()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_address())
        socket.send_fds(self._conn, [_HEADER.pack(len(data))], [child_in, child_out, child_err])
        self._conn.sendall(data)
        for fd in (child_in, child_out, child_err):
            os.close(fd)
        self._buffer = b""
        self.pid = json.loads(self._line(None))["pid"]

        def wrap(fd: int | None, mode: str) -> Any:
            if fd is None:
                return None
            f = os.fdopen(fd, mode + ("" if text else "b"))
            return f

        self.stdin = wrap(ours_in, "w")
        self.stdout = wrap(ours_out, "r")
        self.stderr = wrap(ours_err, "r")

    # -- status
    def _line(self, timeout: float | None) -> bytes:
        """The server's next line; ``TimeoutExpired`` if none comes within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the fork server went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _read_status(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        self.returncode = json.loads(self._line(timeout))["status"]
        self._conn.close()

    def poll(self) -> int | None:
        try:
            self._read_status(0.0)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_status(timeout)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[str, Any] = {}

        def drain(name: str, f: Any) -> None:
            results[name] = f.read()
            f.close()

        threads = [threading.Thread(target=drain, args=(n, f), daemon=True)
                   for n, f in (("out", self.stdout), ("err", self.stderr)) if f is not None]
        for t in threads:
            t.start()
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results.get("out"), results.get("err")

    # -- signals
    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> ForkedProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()


def popen(args: list[str], **kwargs: Any) -> ForkedProcess:
    """``subprocess.Popen(melora_cmd(*args), **kwargs)``, forked from the server."""
    return ForkedProcess(list(args), **kwargs)


def run(args: list[str], *, timeout: float | None = None, capture_output: bool = False, **kwargs: Any
        ) -> subprocess.CompletedProcess:
    """``subprocess.run(melora_cmd(*args), ...)``, forked from the server."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = popen(args, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
