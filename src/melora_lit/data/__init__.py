"""Lightning data modules: GLUE tasks, a user's own text classification data, BBC News, and
instruction tuning data (Alpaca format; chit-chat conversations) for causal language models."""

from .bbc_news import BBCNewsDataModule
from .chat import ChatDataModule, ChitChatConversationsDataModule
from .glue import GLUE_TASKS, GLUEDataModule
from .instruction import ChitChatDataModule, InstructionDataModule
from .text_classification import TextClassificationDataModule

__all__ = ["GLUEDataModule", "GLUE_TASKS", "TextClassificationDataModule", "BBCNewsDataModule",
           "InstructionDataModule", "ChitChatDataModule",
           "ChatDataModule", "ChitChatConversationsDataModule"]
