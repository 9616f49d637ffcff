"""A test aid for real ``melora-lit`` processes: a callback, named in a run's config, that kills
the process with SIGKILL (no handler, no clean-up: as the OOM killer or a node failure would) at
the moment a staged folder output, its files all written, would be renamed into place. The tests
put this folder on the child's ``PYTHONPATH``."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillBeforeRename(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import melora_lit.run as run

        run._publish = lambda tmp, final: os.kill(os.getpid(), signal.SIGKILL)
