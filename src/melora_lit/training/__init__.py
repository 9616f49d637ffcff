"""The Lightning side: the module that puts MELoRA into a frozen backbone, and what a run needs
around it (checkpoints, exact resume, the non-finite guard, monitoring, strategies,
prediction files)."""

# the tasks register themselves as they are defined (tasks.task_class), in this order
from .classification import SequenceClassification
from .causal_lm import CausalLM
from .module import MELoRAModule

__all__ = ["MELoRAModule", "CausalLM", "SequenceClassification"]
