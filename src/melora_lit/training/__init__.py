"""The Lightning side: the module that puts MELoRA into a frozen backbone, and what a run needs
around it (checkpoints, exact resume, the non-finite guard, monitoring, strategies,
prediction files)."""

from .module import MELoRAModule

__all__ = ["MELoRAModule"]
