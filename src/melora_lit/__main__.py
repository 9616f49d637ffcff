"""``melora-lit`` and ``python -m melora_lit``: SIGTERM and SIGUSR1 are taken before the heavy
imports (torch, Lightning, transformers: seconds), so that a signal during start-up, as a
scheduler or a container's stop sends it (a process that is PID 1 has no default action for
SIGTERM), stops the command at its first safe point instead of being lost (melora_lit.run).
"""

from __future__ import annotations


def main() -> None:
    from .run import preemption

    preemption.install()  # records a stop signal until the command knows what it is
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
