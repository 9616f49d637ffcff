"""``melora-lit launch [torchrun options] COMMAND [ARGS]``: torchrun's agent (its options, its
rendezvous, its elastic agent: ``torch.distributed.run`` and ``torch.distributed.launcher``, public
APIs) running ``melora-lit COMMAND ARGS`` as the workers of this node, with what a scheduler needs
around it (:mod:`melora_lit.run` says what a signal and a status mean):

* SIGTERM, SIGUSR1 and SIGINT to the launcher go on to every worker of the node (the process
  group torch starts each in), which stop as one ``melora-lit`` process does (``fit``: one
  resumable save); the workers left after ``--shutdown-timeout`` seconds (default
  :data:`~melora_lit.run.STOP_TIMEOUT_S`: a step and a save) are killed. No worker outlives it.
  The agent runs in a thread of its own, so that the main thread takes a signal at once, also
  while the agent waits in C++ for the other nodes (torchrun ignored SIGTERM there): a signal
  before the workers start ends the launcher with 3 (130 for SIGINT), nothing trained.
* the launcher ends with its workers' status (:func:`~melora_lit.run.job_status`): 3 for a
  preemption on every node, whichever process got the signal; 75 for a lost peer.
* in-place restarts (``--max-restarts``) are refused: the scheduler restarts the whole job, and
  ``fit --ckpt_path auto`` resumes it.

Plain ``torchrun --no-python melora-lit ...`` works too, without these statuses.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import EXIT_PEER_LOST, EXIT_USAGE, first_line
from .run import FORWARDED_SIGNALS, STOP_TIMEOUT_S, job_status, lost_peer, stop_status

__all__ = ["COMMANDS", "main"]

#: What ``launch`` may run: the ``melora-lit`` commands.
COMMANDS = ("fit", "validate", "test", "predict", "export", "evaluate", "report", "generate")


def worker_pids() -> list[int]:
    """The workers this launcher runs: its live children that lead a process group of their own
    (torch starts each worker in a new session, with its DataLoader workers). Linux (/proc)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(ppid) == me and int(pgrp) == int(stat.parent.name) and state != "Z":
            found.append(int(pgrp))
    return found


class _Forward:
    """The launcher's signal handler (the main thread's: torch's agent runs in another thread, so
    a signal is taken at once, even while the agent waits in C++ for the other nodes). Each signal
    goes on to the workers' process groups; the first one also starts the clock after which the
    workers left are killed. Before there are workers (imports, rendezvous) it is recorded:
    :func:`launch` then ends the launcher, unless workers appear at once (they take it)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.pending: float | None = None  # when a signal came that no worker has had yet
        self.grace = float(STOP_TIMEOUT_S)
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        for name in (*FORWARDED_SIGNALS, *_ALSO_FORWARDED):
            signal.signal(getattr(signal, name), self)

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name
        if not self.forward(signum):
            self.pending = self.pending or time.monotonic()

    def forward(self, signum: int) -> bool:
        """Pass ``signum`` on to the workers; False when there are none (yet)."""
        pids = worker_pids()
        for pid in pids:
            _signal_group(pid, signum)
        if pids and self._timer is None:
            self._timer = threading.Timer(self.grace, lambda: [_signal_group(p, signal.SIGKILL) for p in worker_pids()])
            self._timer.daemon = True
            self._timer.start()
        return bool(pids)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


#: What torch's agent passes on besides: the workers end by them (no save), as under torchrun.
_ALSO_FORWARDED = ("SIGHUP", "SIGQUIT")
#: How long a signal that came before the workers waits for them (being started) before the
#: launcher ends without them.
_NO_WORKERS_S = 2.0


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except OSError:  # gone already
        pass


def _parser():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "melora-lit launch"
    parser.usage = "melora-lit launch [torchrun options] COMMAND [ARGS ...]"
    parser.description = (
        "torchrun's agent running `melora-lit COMMAND ARGS` (COMMAND: " + ", ".join(COMMANDS) + ") as the workers "
        "of this node (training_script below is COMMAND). SIGTERM, SIGUSR1 and SIGINT go on to every worker, which "
        "stops as one melora-lit process does (fit: after a resumable save); the workers left after "
        f"--shutdown-timeout seconds (default {STOP_TIMEOUT_S}) are killed. The exit status is the workers': 3 when "
        "preempted, 75 when another node was lost, 2 for a bad input (docs/errors.md). --max-restarts must stay 0: "
        "restart the whole job, fit --ckpt_path auto resumes it.")

    def error(message: str) -> None:
        if "required: training_script" in message:
            message = f"no COMMAND after the torchrun options; give one of {', '.join(COMMANDS)}"
        raise ValueError(f"launch: {message} (see melora-lit launch --help)")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _check(args: Any) -> None:
    """Refuse (one-line ``ValueError``) what ``launch`` cannot run as it promises."""
    command = args.training_script
    if args.max_restarts:
        raise ValueError(f"launch --max-restarts {args.max_restarts}: in-place restarts are not supported (a restarted "
                         f"worker group does not reliably rejoin the others); leave --max-restarts 0 and let the "
                         f"scheduler restart the whole job: fit --ckpt_path auto resumes it from its last checkpoint")
    for flag, given in (("--no-python", args.no_python), ("--module", args.module), ("--run-path", args.run_path)):
        if given:
            raise ValueError(f"launch {flag}: launch runs melora-lit itself (melora-lit launch ... fit ARGS); "
                             f"for another program use torchrun")
    if command not in COMMANDS:
        raise ValueError(f"launch: {command!r} is not a melora-lit command; use one of {', '.join(COMMANDS)} "
                         f"(melora-lit launch [torchrun options] COMMAND [ARGS ...])")


def launch(argv: list[str], forward: _Forward) -> tuple[int, bool]:
    """Parse ``argv`` (torchrun's options, then COMMAND and its arguments), run the workers; the
    node's exit status, and whether torch's agent is still busy (a stop before the workers ran)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import launch_agent
    from torch.distributed.run import config_from_args

    args = _parser().parse_args(argv)
    _check(args)
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = STOP_TIMEOUT_S
    # the workers: this Python, `-m melora_lit COMMAND ARGS` (torchrun's own command-line rules)
    command = args.training_script
    args.training_script, args.training_script_args = "melora_lit", [command, *args.training_script_args]
    args.module = True
    config, entrypoint, cmd_args = config_from_args(args)
    forward.grace = float(config.shutdown_timeout)
    if forward.received:
        return _stopped_before_start(forward.received), False
    ended: dict[str, BaseException | None] = {}

    def agent() -> None:
        try:
            launch_agent(config, entrypoint, list(cmd_args))
            ended["error"] = None
        except BaseException as err:  # noqa: BLE001 - the main thread says what it means
            ended["error"] = err

    # torch warns that, run off the main thread, it installs no signal handlers: _Forward is them
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: "running on a child thread" not in record.getMessage())
    thread = threading.Thread(target=agent, name="melora-lit-launch-agent", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)  # signals are handled here, in the main thread
            if forward.pending is not None and forward.received is not None:
                if forward.forward(getattr(signal, forward.received)):
                    forward.pending = None  # workers that were being started: they stop
                elif time.monotonic() - forward.pending > _NO_WORKERS_S:
                    return _stopped_before_start(forward.received), True
    finally:
        forward.cancel()
    err = ended.get("error")
    if err is None:
        return 0, False
    if isinstance(err, ChildFailedError):
        failures = sorted(err.failures.items(), key=lambda item: item[1].timestamp)  # the first to fail first
        status = job_status([f.exitcode for _, f in failures])
        ended_with = ", ".join(f"rank {rank}: {_shown(f.exitcode)}" for rank, f in failures)
        print(f"melora-lit launch: the workers of this node ended with {ended_with} (exit status {status})",
              file=sys.stderr, flush=True)
        return status, False
    # the agents' rendezvous: a node that never came, or went away
    cause = lost_peer(err) or (first_line(err).rstrip(".") if isinstance(err, RendezvousError) else None)
    if cause is None or os.environ.get("MELORA_LIT_DEBUG"):
        raise err
    print(f"melora-lit: error: launch: lost contact with the other nodes before the workers started: {cause}; "
          f"restart the whole job (--rdzv-conf timeout=SECONDS: how long the nodes wait for each other, "
          f"default 900)", file=sys.stderr, flush=True)
    return EXIT_PEER_LOST, False


def _shown(code: int) -> str:
    return f"{128 - code} (killed by {signal.Signals(-code).name})" if code < 0 else str(code)


def _stopped_before_start(name: str) -> int:
    status = stop_status(name)
    print(f"melora-lit launch: received {name} before the workers started: nothing trained or written "
          f"(exit status {status})", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    """The ``melora-lit launch`` command: a refused input is one ``melora-lit: error:`` line, exit
    status 2; else the exit status of :func:`launch`."""
    forward = _Forward()
    forward.install()  # first: a signal while torch is imported is kept, and stops the launch
    try:
        status, busy = launch(list(sys.argv[2:] if argv is None else argv), forward)
    except ValueError as err:
        if os.environ.get("MELORA_LIT_DEBUG"):
            raise
        print(f"melora-lit: error: {first_line(err)}", file=sys.stderr)
        status, busy = EXIT_USAGE, False
    if busy:  # torch's agent waits in C++ for the other nodes: nothing of it to finish
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
