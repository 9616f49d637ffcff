"""Multi-turn chat data for causal language models: ShareGPT and OpenAI-style conversations,
rendered through a chat template, with the loss on the assistant turns only; optional packing.

A conversation is rendered by the tokenizer's chat template (or a named one of
:data:`CHAT_TEMPLATES`). The trained spans are found by rendering the conversation turn by turn:
an assistant turn is what the template adds after the generation prompt of the turns before it,
up to its end-of-turn marker (the content, then e.g. ``<|im_end|>``; the whitespace that follows
the marker and everything else is scaffolding). The whole rendering is tokenized at once, as
``apply_chat_template(..., tokenize=True)`` does, and a token is trained where it overlaps a span;
a template with generation markers marks the trained tokens itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..errors import first_line
from .base import check_int, seeded_subset
from .causal_lm import IGNORE_INDEX, CausalLMDataModule, Encoder, Rejected, Rows
from .chitchat import chitchat_conversations, chitchat_path

__all__ = ["CHAT_TEMPLATES", "CHAT_FORMATS", "ChatDataModule", "ChitChatConversationsDataModule",
           "ChatTemplateEncoder", "chitchat_conversations"]

# Named templates for tokenizers without one. chatml: the format of ChatML models (Qwen, SmolLM,
# OpenHermes). llama2: the Llama-2-chat format, as in meta-llama/Llama-2-7b-chat-hf's template
# (system message folded into the first user turn, roles must alternate).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

# format -> (messages column, role key, content key, user, assistant, system role names)
CHAT_FORMATS = {
    "sharegpt": ("conversations", "from", "value", "human", "gpt", "system"),
    "openai": ("messages", "role", "content", "user", "assistant", "system"),
}
# format auto: each record's own layout, with the role names of either format
_ANY_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_LAYOUT_KEYS = ("messages_column", "role_key", "content_key", "user_role", "assistant_role", "system_role")


def _columns(rows: list) -> list[str]:
    """The keys of JSON rows, in order of appearance."""
    return list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))


class ChatTemplateEncoder(Encoder):
    """Conversations -> token ids and labels, for one tokenizer and chat template.

    ``records`` reads each row's turns (in the file's layout, or with ``format: auto`` in the
    row's own) as ``{role, content}`` messages, a bad row a :class:`Rejected` reason.
    ``encode`` returns ``input_ids`` and ``labels``. The ids are the whole rendering tokenized at
    once, as ``tokenizer.apply_chat_template(messages, tokenize=True)`` gives them; the labels are
    those ids on the assistant turns (content and the template's own end-of-turn marker; EOS is
    inserted only after a turn the template ends with no marker) and ``-100`` elsewhere, or the ids
    everywhere with ``train_on_inputs``. A template with generation markers
    (``{% generation %}``) says itself which tokens are the assistant's.
    """

    reads_rows = True
    too_long = "no assistant token within max_length"
    dropped_line = ("{split}: dropped {n} of {total} conversations with no assistant token within "
                    "max_length={max_length}")
    none_left_line = "no {split} conversation has an assistant token within max_length={max_length}; raise max_length"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None,
                 train_on_inputs: bool = False, max_length: int = 1024, format: str = "auto",  # noqa: A002
                 layout: dict[str, str | None] | None = None, system_prompt: str | None = None,
                 bad_records: str = "drop") -> None:
        self.tokenizer = tokenizer
        self.format = format
        self.layout = layout or dict.fromkeys(_LAYOUT_KEYS)
        self.system_prompt = system_prompt
        self.bad_records = bad_records
        self.template = CHAT_TEMPLATES.get(chat_template, chat_template) if chat_template else None
        self.train_on_inputs = train_on_inputs
        self.max_length = max_length
        try:
            template = tokenizer.get_chat_template(self.template)
        except ValueError:  # no template at all: render says so, per record
            template = ""
        # transformers' assistant mask needs the offsets of a fast tokenizer
        self.generation_marked = bool(_GENERATION.search(template)) and tokenizer.is_fast

    def _apply(self, messages: list[dict], **kwargs: Any) -> Any:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)
        except Exception as err:  # jinja's raise_exception and template errors alike
            raise Rejected("the chat template refused it", f": {first_line(err)}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def spans(self, messages: list[dict], text: str) -> list[tuple[int, int, bool]]:
        """The assistant turns of ``text`` (the rendering of ``messages``) as ``(start, end, eos)``
        character spans: what the template adds after the generation prompt of the turns before
        it, up to its end-of-turn marker (the whitespace after it is scaffolding); ``eos`` where
        the turn ends with its content, no marker after it."""
        spans: list[tuple[int, int, bool]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)  # i > 0: see _problem
            upto = self.render(messages[:i + 1])
            if not (text.startswith(upto) and upto.startswith(before)) or (spans and len(before) < spans[-1][1]):
                raise ValueError("the chat template does not render a conversation turn by turn (an earlier "
                                 "turn renders differently once later turns follow); use a named chat_template")
            turn = upto[len(before):].rstrip()
            content = m["content"].strip()
            marked = bool(turn.strip()) and not (content and turn.endswith(content))
            spans.append((len(before), len(before) + len(turn), not marked))
        return spans

    def _tokens(self, text: str, spans: list[tuple[int, int, bool]]) -> tuple[list[int], list[bool]]:
        """The ids of ``text`` and whether each is trained: one that overlaps a span is (as
        transformers' assistant mask has it); EOS is inserted after a span that asks for it."""
        tok = self.tokenizer
        if tok.is_fast:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            tokens = list(zip(enc["input_ids"], enc["offset_mapping"]))
        else:  # no offsets: the pieces between span boundaries are tokenized apart
            cuts = sorted({0, len(text), *(c for s in spans for c in s[:2])})
            pieces = list(zip(cuts, cuts[1:]))
            per_piece = tok([text[a:b] for a, b in pieces], add_special_tokens=False)["input_ids"]
            tokens = [(t, piece) for piece, piece_ids in zip(pieces, per_piece) for t in piece_ids]
        ids: list[int] = []
        trained: list[bool] = []
        k = 0
        for token, (start, end) in [*tokens, (None, (len(text) + 1, 0))]:  # the last: past every span
            while k < len(spans) and start >= spans[k][1]:
                if spans[k][2]:
                    ids.append(tok.eos_token_id)
                    trained.append(True)
                k += 1
            if token is not None:
                ids.append(token)
                trained.append(k < len(spans) and end > spans[k][0])
        return ids, trained

    def encode(self, record: dict[str, Any], with_labels: bool = True) -> dict[str, list[int]]:
        """Ids and labels of a whole conversation (``record["messages"]``, ``with_labels``), or the
        ids of the prompt that asks for its next assistant turn (the last ``max_length`` tokens).
        Rejected: a turn the template refuses; with labels, no assistant token within ``max_length``."""
        messages = record["messages"]
        if not with_labels:
            text = self.render(messages, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_length:]
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if self.generation_marked:
            out = self._apply(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, trained = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        else:
            text = self.render(messages)
            ids, trained = self._tokens(text, self.spans(messages, text))
        labels = [i if t or self.train_on_inputs else IGNORE_INDEX for i, t in zip(ids, trained)]
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise Rejected(self.too_long)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def prompt(self, record: dict[str, Any]) -> str:
        return self.render(record["messages"], add_generation_prompt=True)

    # ---- records --------------------------------------------------------------------------

    def _layout(self, rows: Rows, columns: list[str], source: str) -> dict[str, str]:
        fmt = self.format
        column = self.layout["messages_column"]
        if fmt == "auto":
            found = [f for f, spec in CHAT_FORMATS.items() if spec[0] == column or (column is None and spec[0] in columns)]
            if column is not None and column in columns and not found:  # a custom column: its turns' keys say
                turn = next((t[0] for t in (row.get(column) for row in rows if isinstance(row, dict))
                             if isinstance(t, list) and t
                             and isinstance(t[0], dict)), {})
                found = ["sharegpt" if "from" in turn else "openai"]
            if not found:
                raise ValueError(f"{source} has no 'conversations' (ShareGPT) or 'messages' (OpenAI) column; "
                                 f"its columns are {columns} (set data.messages_column)")
            fmt = found[0]
        defaults = dict(zip(self.layout, CHAT_FORMATS[fmt]))
        layout = {k: v if v is not None else defaults[k] for k, v in self.layout.items()}
        if layout["messages_column"] not in columns:
            raise ValueError(f"{source} has no column {layout['messages_column']!r}; its columns are {columns}")
        return layout

    def records(self, rows: Rows, source: str, with_output: bool = True,
                layout: dict[str, str] | None = None) -> tuple[Dataset, dict[str, list[int]]]:
        """A ``messages`` column of ``{role, content}`` turns with roles system/user/assistant and
        a ``record`` column (the row's number in the source, from 1); bad records are left out, or
        refused, as ``bad_records`` says. With ``format: auto`` and no layout option, each record
        has its own layout (see :meth:`_messages`)."""
        columns = list(rows.column_names) if isinstance(rows, Dataset) else _columns(rows)
        if layout is None and (self.format != "auto" or any(v is not None for v in self.layout.values())):
            layout = self._layout(rows, columns, source)
        elif layout is None and not {"messages", "conversations"} & set(columns):
            raise ValueError(f"{source} has no 'conversations' (ShareGPT) or 'messages' (OpenAI) column; "
                             f"its columns are {columns} (set data.messages_column)")
        out: dict[str, list] = {"messages": [], "record": []}
        reasons: dict[str, list[int]] = {}  # kind -> record numbers
        for number, row in enumerate(rows, start=1):
            try:
                messages = self._messages(row, layout)
                problem = _problem(messages, with_output)
                if problem:
                    raise problem
            except Rejected as err:
                if self.bad_records == "error":
                    raise ValueError(f"{source} record {number}: {err} (bad_records: drop skips such records)") \
                        from None
                reasons.setdefault(err.kind, []).append(number)
                continue
            out["messages"].append(messages)
            out["record"].append(number)
        if not out["record"]:
            raise ValueError(f"{source} has no usable conversation (dropped {sum(map(len, reasons.values()))} "
                             "bad records)")
        return Dataset.from_dict(out), reasons

    def from_lines(self, lines: list[str]) -> Dataset:
        rows = [{"messages": [{"role": "user", "content": t}]} for t in lines]
        return self.records(rows, "", with_output=False, layout=dict(zip(_LAYOUT_KEYS, CHAT_FORMATS["openai"])))[0]

    def prompts(self, ds: Dataset) -> Dataset:
        """Each conversation up to its last assistant turn (``messages``) and that turn's content
        (``reference``; empty when the conversation ends with another role)."""
        def cut(row: dict) -> dict:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None or last < len(messages) - 1:
                return {"messages": messages, "reference": ""}
            return {"messages": messages[:last], "reference": messages[last]["content"]}

        return ds.map(cut, desc="Prompts")

    def examples(self, ds: Dataset) -> Dataset:
        return self.prompts(ds)

    def _messages(self, row: Any, layout: dict[str, str] | None) -> list[dict[str, str]]:
        """The turns of a record as ``{role, content}`` with roles system/user/assistant: in
        ``layout``, or (None) in the record's own: ``messages`` or ``conversations`` (whichever
        holds turns), turns keyed ``role``/``content`` or ``from``/``value`` (as its first turn is),
        roles user/human, assistant/gpt, system."""
        if not isinstance(row, dict):
            raise Rejected("not a JSON object", f": {type(row).__name__} {row!r:.40}")
        if layout is not None:
            turns = row.get(layout["messages_column"])
            role_key, content_key = layout["role_key"], layout["content_key"]
            roles = {layout["user_role"]: "user", layout["assistant_role"]: "assistant",
                     layout["system_role"]: "system"}
        else:
            found = [c for c in ("messages", "conversations") if row.get(c)]
            if len(found) > 1:
                raise Rejected("both messages and conversations", ": keep one of them")
            turns = row[found[0]] if found else row.get("messages", row.get("conversations"))
            first = next((t for t in turns if isinstance(t, dict)), {}) if isinstance(turns, (list, tuple)) else {}
            role_key, content_key = ("from", "value") if "from" in first else ("role", "content")
            roles = _ANY_ROLES
        if turns is None:
            turns = []
        if not isinstance(turns, (list, tuple)):
            raise Rejected("not a list of turns", f": {type(turns).__name__} {turns!r:.40}")
        messages = []
        if self.system_prompt and not any(isinstance(t, dict) and roles.get(t.get(role_key)) == "system"
                                          for t in turns):
            messages.append({"role": "system", "content": self.system_prompt})
        for k, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                raise Rejected("turn not an object", f": turn {k} is {type(turn).__name__} {turn!r:.40}")
            role = turn.get(role_key)
            if role not in roles:
                raise Rejected("unknown role", f" {role!r} in turn {k}; roles are {', '.join(map(repr, roles))}")
            content = turn.get(content_key)
            if not isinstance(content, str):
                raise Rejected("non-string content", f": turn {k} content is {type(content).__name__} {content!r:.40}")
            messages.append({"role": roles[role], "content": content})
        return messages if turns else []


def _problem(messages: Any, with_answer: bool) -> "Rejected | None":
    """Why a normalized conversation cannot be used, or None."""
    if not messages:
        return Rejected("empty conversation")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first == "assistant":  # nothing to answer; and a template renders no prompt before it
        return Rejected("starts with an assistant turn")
    for k, (a, b) in enumerate(zip(messages, messages[1:]), start=1):
        if a["role"] == b["role"] == "assistant":
            return Rejected("two assistant turns in a row", f" (turns {k} and {k + 1})")
    if with_answer and not any(m["role"] == "assistant" for m in messages):
        return Rejected("no assistant turn")
    return None




class _ChatTemplateDataModule(CausalLMDataModule):
    """Conversations through a chat template: what :class:`ChatDataModule` and
    :class:`ChitChatConversationsDataModule` share."""

    format = "openai"
    layout: dict[str, str | None] = dict.fromkeys(_LAYOUT_KEYS)

    def __init__(self, chat_template: str | None = None, packing: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if chat_template is not None and chat_template not in CHAT_TEMPLATES and "{" not in chat_template:
            raise ValueError(f"chat_template={chat_template!r} is not valid; use one of "
                             f"{', '.join(CHAT_TEMPLATES)} or a Jinja template")
        self.chat_template = chat_template
        self.packing = packing

    def _check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.chat_template is None and not tokenizer.chat_template:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has no chat template; set data.chat_template "
                             f"to one of {', '.join(CHAT_TEMPLATES)}")
        if self.chat_template is not None:
            # the named template becomes the tokenizer's own, so generation and evaluation use it
            tokenizer.chat_template = CHAT_TEMPLATES.get(self.chat_template, self.chat_template)

    def _make_encoder(self, tokenizer: PreTrainedTokenizerBase) -> ChatTemplateEncoder:
        return ChatTemplateEncoder(tokenizer, None, self.train_on_inputs, self.max_length, self.format, self.layout,
                                   self.system_prompt, self.bad_records)

    def format_prompt(self, messages: list[dict[str, str]]) -> str:
        """The rendered prompt that asks for the next assistant turn of ``messages``."""
        return self.encoder.render(messages, add_generation_prompt=True)

    def _record_settings(self) -> dict[str, Any]:
        return {"format": self.format, **self.layout}


class ChatDataModule(_ChatTemplateDataModule):
    """Multi-turn chat data for a causal language model: ShareGPT or OpenAI-style conversations.

    ShareGPT records hold ``conversations``: a list of ``{"from": ..., "value": ...}`` turns with
    roles ``human``, ``gpt`` and ``system``; OpenAI-style records hold ``messages``: a list of
    ``{"role": ..., "content": ...}`` with roles ``user``, ``assistant`` and ``system``. They come
    from a ``.json`` (a list of records), ``.jsonl`` or ``.parquet`` file, or a hub dataset; the
    column, its keys and the role names can be set for other layouts.

    Each conversation is rendered by the tokenizer's chat template, or by a named one
    (``chat_template: chatml`` or ``llama2``) for a tokenizer without one. The loss is on every
    assistant turn (its content and the template's end-of-turn marker) and nowhere else, unless
    ``train_on_inputs``. A conversation longer than ``max_length`` is cut there; one with no
    assistant token left is dropped (counted in :attr:`dropped`). Splits and batches:
    :class:`~melora_lit.data.causal_lm.CausalLMDataModule`.

    Bad records (an empty conversation, two assistant turns in a row, an unknown role, a content
    that is not a string, no assistant turn, a turn the template refuses) are dropped and counted
    with a warning (``bad_records: drop``, the counts by reason in :attr:`dropped`) or refused with an error
    naming the file and record (``bad_records: error``). A file that cannot be read (not UTF-8, a
    line that is not JSON) is refused either way, naming the line.

    ``packing: true`` concatenates the tokenized train and validation conversations into rows of
    up to ``max_length`` tokens, with position ids restarting at each conversation; the model
    keeps conversations from attending to each other (see :mod:`melora_lit.data.packing`).

    ``predict`` (and the generation evaluation of
    :class:`~melora_lit.training.generation_eval.GenerationEvaluation`) answers the prompt of each
    conversation up to its last assistant turn, whose content is the ``reference``.

    Args:
        train_file: Train conversations (``.json``, ``.jsonl`` or ``.parquet``).
        validation_file: Validation conversations (default: ``val_size`` of the train records).
        dataset_name: A hub dataset to use instead of ``train_file``.
        dataset_config_name: Configuration of ``dataset_name``.
        dataset_split: Split of ``dataset_name`` that holds the train records.
        format: ``auto`` (each record in its own layout: ``messages`` or ``conversations``,
            ``role``/``content`` or ``from``/``value`` turns), or ``sharegpt`` or ``openai`` (one
            layout for the file). Sets the defaults of the next six options; setting any of them
            also makes one layout for the file.
        messages_column: Column of the conversations.
        role_key: Key of a turn's role.
        content_key: Key of a turn's text.
        user_role: Role name of the user's turns in the data.
        assistant_role: Role name of the assistant's turns in the data.
        system_role: Role name of system messages in the data.
        chat_template: ``chatml``, ``llama2`` (named templates) or a Jinja template; default the
            tokenizer's own.
        bad_records: ``drop`` (count and skip them) or ``error`` (stop at the first, naming it).
        packing: Pack train and validation conversations into rows of ``max_length`` tokens.
        max_length: Longest token sequence (a packed row's length).
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        dataset_split: str = "train",
        format: Literal["auto", "sharegpt", "openai"] = "auto",  # noqa: A002 - the option's name
        messages_column: str | None = None,
        role_key: str | None = None,
        content_key: str | None = None,
        user_role: str | None = None,
        assistant_role: str | None = None,
        system_role: str | None = None,
        chat_template: str | None = None,
        bad_records: Literal["drop", "error"] = "drop",
        packing: bool = False,
        max_length: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(chat_template=chat_template, packing=packing, max_length=max_length, **kwargs)
        for path in (train_file, validation_file, self.predict_file):
            if path is not None and Path(path).suffix.lower() == ".csv":
                raise ValueError(f"a CSV file cannot hold conversations: {path}; use .json, .jsonl or .parquet")
        self._set_source(train_file, validation_file, dataset_name, dataset_config_name, dataset_split)
        if format not in ("auto", *CHAT_FORMATS):
            raise ValueError(f"format={format!r} is not valid; use one of auto, {', '.join(CHAT_FORMATS)}")
        if bad_records not in ("drop", "error"):
            raise ValueError(f"bad_records={bad_records!r} is not valid; use drop or error")
        self.format = format
        self.layout = {"messages_column": messages_column, "role_key": role_key, "content_key": content_key,
                       "user_role": user_role, "assistant_role": assistant_role, "system_role": system_role}
        self.bad_records = bad_records


class ChitChatConversationsDataModule(_ChatTemplateDataModule):
    """Offline multi-turn chats: the BYU PCC lab's Chit-Chat Challenge conversations shipped by
    the PyPI package ``chitchat-dataset``, cut into chats of up to ``max_messages`` messages (see
    :func:`chitchat_conversations`). ``max_records`` keeps a seeded random subset of the chats
    (before the validation split). Everything else is as in :class:`ChatDataModule`.

    Args:
        max_records: Use a seeded random subset of this many chats (default: all).
        max_messages: Messages per chat (a conversation longer than this gives several chats).
        chat_template: ``chatml``, ``llama2`` or a Jinja template (default: the tokenizer's).
        packing: Pack chats into rows of ``max_length`` tokens.
    """

    def __init__(self, max_records: int | None = None, max_messages: int = 6, chat_template: str | None = None,
                 packing: bool = False, **kwargs: Any) -> None:
        check_int("max_records", max_records, minimum=2, optional=True)
        check_int("max_messages", max_messages, minimum=2)
        super().__init__(chat_template=chat_template, packing=packing, **kwargs)
        self.max_records = max_records
        self.max_messages = max_messages

    def _describe_train(self) -> str:
        return "the chitchat-dataset conversations"

    def _train_source(self) -> tuple[list[Any], dict[str, Any]]:
        return [chitchat_path()], {"max_records": self.max_records, "max_messages": self.max_messages}

    def _read_train(self) -> list:
        return seeded_subset(list(chitchat_conversations(self.max_messages)), self.max_records, self.seed)
