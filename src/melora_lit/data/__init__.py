"""Lightning data modules: GLUE tasks, a user's own text classification data, BBC News, and
causal-LM data (one base, :mod:`~melora_lit.data.causal_lm`): instruction records in a prompt
format (Alpaca; chit-chat pairs) and conversations through a chat template."""

from .bbc_news import BBCNewsDataModule
from .chat import ChatDataModule, ChitChatConversationsDataModule
from .glue import GLUE_TASKS, GLUEDataModule
from .instruction import ChitChatDataModule, InstructionDataModule
from .text_classification import TextClassificationDataModule

__all__ = ["GLUEDataModule", "GLUE_TASKS", "TextClassificationDataModule", "BBCNewsDataModule",
           "InstructionDataModule", "ChitChatDataModule",
           "ChatDataModule", "ChitChatConversationsDataModule"]
