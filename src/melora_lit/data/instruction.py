"""Instruction tuning data for causal language models: Alpaca-format records in a prompt format
(:class:`PromptEncoder`), from files or the hub (:class:`InstructionDataModule`) or from the
chit-chat conversations of the PyPI package ``chitchat-dataset`` as prompt -> reply pairs
(:class:`ChitChatDataModule`). Reading, splits, batches: :mod:`melora_lit.data.causal_lm`.
"""

from __future__ import annotations

from typing import Any, Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .base import check_int, seeded_subset
from .causal_lm import IGNORE_INDEX, CausalLMDataModule, Encoder, LengthGroupedSampler, Rejected, Rows
from .chitchat import chitchat_pairs, chitchat_path

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "InstructionDataModule",
    "ChitChatDataModule",
    "LengthGroupedSampler",
    "PromptEncoder",
    "chitchat_pairs",
]

# The Stanford Alpaca templates, verbatim (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT). The
# response follows "### Response:" directly and ends with the EOS token.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
RECORD_FIELDS = ("instruction", "input", "output")


class PromptEncoder(Encoder):
    """Alpaca records (``instruction``, ``input``, ``output``) -> prompt text and token ids, for one
    tokenizer and prompt format.

    ``encode`` builds ``prompt_ids + response_ids + [EOS]``: the prompt and the response are
    tokenized apart, so the boundary between them is exact and ``predict`` feeds the model the very
    prompt ids it was trained on. Alpaca prompts get the BOS token the tokenizer adds (Llama) and
    never an EOS; chat prompts are the template's text, special tokens included. A chat response is
    what the template adds for the assistant's turn (the output and the end-of-turn marker); EOS
    is appended unless that already contains it. A record whose prompt leaves no room for a
    response token in ``max_length`` is rejected.
    """

    too_long = "prompt fills max_length"
    dropped_line = ("{split}: dropped {n} of {total} records whose prompt fills max_length={max_length} tokens "
                    "(no response token left to learn from)")
    none_left_line = "every {split} record's prompt fills max_length={max_length}; raise max_length"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str = "alpaca",
                 system_prompt: str | None = None, train_on_inputs: bool = False, max_length: int = 256,
                 columns: tuple[str, str, str] = RECORD_FIELDS) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.train_on_inputs = train_on_inputs
        self.max_length = max_length
        self.columns = dict(zip(RECORD_FIELDS, columns))
        bos = tokenizer.bos_token_id
        self.bos = [bos] if prompt_format == "alpaca" and bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []

    # ---- records --------------------------------------------------------------------------

    def records(self, rows: Rows, source: str, with_output: bool = True) -> tuple[Dataset, dict[str, list[int]]]:
        """Columns ``instruction``, ``input`` and (with_output) ``output`` as strings; an
        instruction column is required, a missing input column means no inputs."""
        cols = dict(self.columns) if with_output else {k: v for k, v in self.columns.items() if k != "output"}
        required = [self.columns["instruction"]] + ([self.columns["output"]] if with_output else [])
        missing = [c for c in required if c not in rows.column_names]
        if missing:
            raise ValueError(f"{source} has no column(s) {missing}; its columns are {rows.column_names}")
        first = self.columns["instruction"]

        def convert(batch: dict[str, list]) -> dict[str, list]:
            n = len(batch[first])
            return {key: ["" if v is None else str(v) for v in (batch[col] if col in batch else [""] * n)]
                    for key, col in cols.items()}

        drop = [c for c in cols.values() if c in rows.column_names and c not in cols]
        return rows.map(convert, batched=True, remove_columns=drop, desc="Reading records"), {}

    def from_lines(self, lines: list[str]) -> Dataset:
        return Dataset.from_dict({"instruction": lines, "input": [""] * len(lines)})

    def examples(self, ds: Dataset) -> Dataset:
        def example(row: dict, i: int) -> dict:
            return {"record": i + 1, "messages": self._messages(row["instruction"], row["input"]),
                    "reference": row["output"]}

        return ds.map(example, with_indices=True, desc="Prompts")

    # ---- text and tokens ------------------------------------------------------------------

    def prompt(self, record: dict[str, Any]) -> str:
        return self.format(record["instruction"], record.get("input", ""))

    def format(self, instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
        """The prompt text of an instruction and its input."""
        if self.prompt_format == "alpaca":
            if input:
                return ALPACA_PROMPT.format(instruction=instruction, input=input)
            return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        return self.tokenizer.apply_chat_template(self._messages(instruction, input), add_generation_prompt=True,
                                                  tokenize=False)

    def _messages(self, instruction: str, input: str, output: str | None = None) -> list[dict]:  # noqa: A002
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction})
        if output is not None:
            messages.append({"role": "assistant", "content": output})
        return messages

    def response(self, instruction: str, input: str, output: str, prompt: str) -> str:  # noqa: A002
        """The text that follows the prompt in a training sequence."""
        if self.prompt_format == "alpaca":
            return output
        full = self.tokenizer.apply_chat_template(self._messages(instruction, input, output), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not continue the generation prompt with the "
                             "assistant's turn; use prompt_format: alpaca")
        return full[len(prompt):]

    def check(self, record: dict[str, Any]) -> None:
        """A chat template must continue the generation prompt with the assistant's turn."""
        if self.prompt_format != "alpaca":
            i, x = record["instruction"], record["input"]
            self.response(i, x, record.get("output", "x"), self.format(i, x))

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.bos + ids

    def encode(self, record: dict[str, Any], with_labels: bool = True) -> dict[str, list[int]]:
        prompt = self.prompt(record)
        p = self.prompt_ids(prompt)
        if not with_labels:
            return {"input_ids": p, "attention_mask": [1] * len(p)}
        response = self.response(record["instruction"], record["input"], record["output"], prompt)
        r = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if self.prompt_format == "alpaca" or eos not in r:
            r = [*r, eos]
        room = self.max_length - len(p)
        if room < 1:
            raise Rejected(self.too_long)
        r = r[:room]
        labels = (list(p) if self.train_on_inputs else [IGNORE_INDEX] * len(p)) + r
        return {"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)), "labels": labels}


class _PromptDataModule(CausalLMDataModule):
    """Records in a prompt format: what :class:`InstructionDataModule` and
    :class:`ChitChatDataModule` share."""

    columns: tuple[str, str, str] = RECORD_FIELDS

    def __init__(self, prompt_format: Literal["alpaca", "chat"] = "alpaca", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if prompt_format not in ("alpaca", "chat"):
            raise ValueError(f"prompt_format={prompt_format!r} is not valid; use 'alpaca' or 'chat'")
        self.prompt_format = prompt_format

    def _check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.prompt_format == "chat" and not tokenizer.chat_template:
            raise ValueError(f"prompt_format='chat' needs a tokenizer with a chat template; "
                             f"{self.tokenizer_name!r} has none (use prompt_format: alpaca)")

    def _make_encoder(self, tokenizer: PreTrainedTokenizerBase) -> PromptEncoder:
        return PromptEncoder(tokenizer, self.prompt_format, self.system_prompt, self.train_on_inputs,
                             self.max_length, self.columns)

    def format_prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
        """The prompt text of a record, ending where the response begins."""
        return self.encoder.format(instruction, input)

    def _record_settings(self) -> dict[str, Any]:
        return {"columns": list(self.columns)}


class InstructionDataModule(_PromptDataModule):
    """Instruction tuning data in the Alpaca format, for a causal language model.

    Records hold ``instruction``, ``input`` (may be empty or missing) and ``output``; they come
    from a JSON file (a list of records, as ``alpaca_data.json``), a JSON-lines, CSV or parquet
    file, or a hub dataset (``yahma/alpaca-cleaned``, the data of the paper's code).

    Each record becomes ``prompt + response + EOS`` token ids. The prompt is the Stanford Alpaca
    template (``prompt_format: alpaca``; with or without the input section) or the tokenizer's
    chat template (``prompt_format: chat``: instruction and input as the user's turn, the output as
    the assistant's). Labels are ``-100`` on the prompt (unless ``train_on_inputs``) and on the
    padding, so the loss is on the response only. Records longer than ``max_length`` lose the end
    of their response; a record whose prompt alone fills ``max_length`` has no response token left
    to learn from and is dropped (counted in the log and in :attr:`dropped`). Splits and batches:
    :class:`~melora_lit.data.causal_lm.CausalLMDataModule`.

    Args:
        train_file: Train records (``.json``, ``.jsonl``, ``.csv`` or ``.parquet``).
        validation_file: Validation records (default: ``val_size`` of the train records).
        dataset_name: A hub dataset to use instead of ``train_file`` (e.g. ``yahma/alpaca-cleaned``).
        dataset_config_name: Configuration of ``dataset_name``.
        dataset_split: Split of ``dataset_name`` that holds the train records.
        instruction_column: Column of the instructions.
        input_column: Column of the inputs (the optional context); missing or empty = no input.
        output_column: Column of the responses.
        prompt_format: ``alpaca`` (the Stanford Alpaca template) or ``chat`` (the tokenizer's chat
            template).
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        dataset_split: str = "train",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        prompt_format: Literal["alpaca", "chat"] = "alpaca",
        **kwargs: Any,
    ) -> None:
        super().__init__(prompt_format=prompt_format, **kwargs)
        self._set_source(train_file, validation_file, dataset_name, dataset_config_name, dataset_split)
        self.instruction_column, self.input_column, self.output_column = instruction_column, input_column, output_column
        self.columns = (instruction_column, input_column, output_column)


class ChitChatDataModule(_PromptDataModule):
    """Open-domain chit-chat as instruction data, offline: 7,168 real conversations (about 132k
    prompt -> reply pairs) of the BYU PCC lab's Chit-Chat Challenge, shipped by the PyPI package
    ``chitchat-dataset`` (``pip install chitchat-dataset``).

    Every reply becomes a record whose instruction is the message it answers (see
    :func:`~melora_lit.data.chitchat.chitchat_pairs`). ``max_records`` keeps a seeded random subset
    of the pairs (before the validation split), which keeps a CPU run short. Everything else is as
    in :class:`InstructionDataModule`; ``prompt_format: chat`` suits a chat model.

    Args:
        max_records: Use a seeded random subset of this many pairs (default: all).
        context_turns: Earlier messages given as the record's input, oldest first (0: none).
        prompt_format: ``alpaca`` or ``chat`` (see :class:`InstructionDataModule`).
        max_length: Longest token sequence.
    """

    def __init__(
        self,
        max_records: int | None = None,
        context_turns: int = 0,
        prompt_format: Literal["alpaca", "chat"] = "alpaca",
        max_length: int = 128,
        **kwargs: Any,
    ) -> None:
        check_int("max_records", max_records, minimum=2, optional=True)
        check_int("context_turns", context_turns, minimum=0)
        super().__init__(prompt_format=prompt_format, max_length=max_length, **kwargs)
        self.max_records = max_records
        self.context_turns = context_turns

    def _describe_train(self) -> str:
        return "the chitchat-dataset conversations"

    def _train_source(self) -> tuple[list[Any], dict[str, Any]]:
        return [chitchat_path()], {"max_records": self.max_records, "context_turns": self.context_turns}

    def _read_train(self) -> Dataset:
        records = seeded_subset(list(chitchat_pairs(self.context_turns)), self.max_records, self.seed)
        return Dataset.from_dict({k: [r[k] for r in records] for k in RECORD_FIELDS})
