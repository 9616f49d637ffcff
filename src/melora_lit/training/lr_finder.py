"""Make Lightning's :class:`~lightning.pytorch.callbacks.LearningRateFinder` train with the rate it finds.

The finder runs in ``on_fit_start``, after the optimizer and its scheduler were built. It sets
the module's ``learning_rate`` and every parameter group's current ``lr``, but a scheduler
(melora-lit's linear warmup/decay, a ``LambdaLR``) recomputes ``lr`` from its own base rates at
the next step: the run would go on with the configured rate, and the head's group would get the
adapter's rate for one step. :class:`ApplyFoundLearningRate` (always on in the CLI) rebuilds the
optimizer and scheduler from the module once the finder is done, so both follow the new
``learning_rate`` (the head keeps ``head_learning_rate``).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateFinder

__all__ = ["ApplyFoundLearningRate"]


class ApplyFoundLearningRate(Callback):
    """After a :class:`~lightning.pytorch.callbacks.LearningRateFinder` found a rate, rebuild the
    optimizer and scheduler (``configure_optimizers``) before the first training step. Not on a
    resumed run: its optimizer state comes from the checkpoint."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = any(isinstance(c, LearningRateFinder) and c.optimal_lr is not None
                    and c.optimal_lr.suggestion() is not None for c in trainer.callbacks)
        if found and trainer.global_step == 0:
            trainer.strategy.setup_optimizers(trainer)
