"""The Chit-Chat Challenge conversations (BYU PCC lab) that the PyPI package ``chitchat-dataset``
ships, read in one place: as prompt -> reply records (:func:`chitchat_pairs`) and as chats
(:func:`chitchat_conversations`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

__all__ = ["chitchat_path", "chitchat_turns", "chitchat_pairs", "chitchat_conversations"]


def chitchat_path() -> str:
    """The conversations file that the ``chitchat-dataset`` package ships."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("chit-chat data needs the chitchat-dataset package: pip install chitchat-dataset")
    return str(Path(next(iter(spec.submodule_search_locations))) / "dataset.json")


def chitchat_turns(path: str | None = None) -> Iterator[list[str]]:
    """The messages of each conversation, in file order: a message is its sender's consecutive
    utterances joined by spaces; empty messages are left out."""
    with open(path or chitchat_path(), encoding="utf-8") as f:
        conversations = json.load(f)
    for conv in conversations.values():
        turns = [" ".join(u["text"].strip() for u in message).strip() for message in conv["messages"]]
        yield [t for t in turns if t]


def chitchat_pairs(context_turns: int = 0, path: str | None = None) -> Iterator[dict[str, str]]:
    """Prompt -> reply records: for every message after the first, ``instruction`` is the message
    it answers, ``input`` the ``context_turns`` messages before that (oldest first, one per line;
    empty for 0), ``output`` the message."""
    for turns in chitchat_turns(path):
        for i in range(1, len(turns)):
            context = turns[max(0, i - 1 - context_turns):i - 1] if context_turns else []
            yield {"instruction": turns[i - 1], "input": "\n".join(context), "output": turns[i]}


def chitchat_conversations(max_messages: int = 6, path: str | None = None) -> Iterator[dict[str, list]]:
    """OpenAI-style chats: each conversation cut into chats of up to ``max_messages`` messages, the
    first speaker of each chat as the user and the other as the assistant, alternating; chats
    without an assistant message are left out."""
    for turns in chitchat_turns(path):
        for start in range(0, len(turns), max_messages):
            chunk = turns[start:start + max_messages]
            if len(chunk) >= 2:
                yield {"messages": [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(chunk)]}
