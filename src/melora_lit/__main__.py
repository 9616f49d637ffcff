"""``melora-lit`` and ``python -m melora_lit``: SIGTERM and SIGUSR1 are taken before the heavy
imports (torch, Lightning, transformers: seconds), so that a signal during start-up, as a
scheduler or a container's stop sends it (a process that is PID 1 has no default action for
SIGTERM), stops the command at its first safe point instead of being lost (melora_lit.run).
Known-harmless messages of third-party imports are silenced here too (:func:`quiet_known_noise`).
"""

from __future__ import annotations


#: Loggers of third-party imports whose warnings at import are known and harmless on every start:
#: torchao's "Failed to load .../_C_*.so" (kernels for GPUs it does not find) and "Detected no
#: triton", and torch's pytree note on torchao's enums. Errors still show; our own warnings too.
KNOWN_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_known_noise() -> None:
    import logging

    for name in KNOWN_NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    import sys

    if sys.argv[1:2] == ["launch"]:  # torchrun's agent around melora-lit workers: its own signal handling
        from .launch import main as launch_main

        return launch_main(sys.argv[2:])
    from .run import preemption

    preemption.install()  # records a stop signal until the command knows what it is
    quiet_known_noise()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
