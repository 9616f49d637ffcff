"""Lightning data modules: GLUE tasks, a user's own text classification data, and BBC News."""

from .bbc_news import BBCNewsDataModule
from .glue import GLUE_TASKS, GLUEDataModule
from .text_classification import TextClassificationDataModule

__all__ = ["GLUEDataModule", "GLUE_TASKS", "TextClassificationDataModule", "BBCNewsDataModule"]
