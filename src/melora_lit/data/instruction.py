"""Instruction tuning data for causal language models: Alpaca-format records, prompt formats,
response-only labels, truncation, length-grouped batches; and chit-chat conversations shipped by
the PyPI package ``chitchat-dataset`` as offline prompt -> reply pairs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from datasets import Dataset, load_dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from ..training.metrics import language_modeling_metrics
from ..errors import check_utf8, data_file_error, describe, not_found
from ..training.resume import ResumableSampler
from .base import DataTask, MELoRADataModule, check_int, seeded_subset

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "InstructionDataModule",
    "ChitChatDataModule",
    "LengthGroupedSampler",
    "PromptFormatter",
    "chitchat_pairs",
]

IGNORE_INDEX = -100

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

# record file types: extension -> datasets builder
_RECORD_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class LengthGroupedSampler(ResumableSampler):
    """Indices in a seeded random order in which neighbours have similar lengths.

    Each epoch: a random permutation, cut into mega-batches of ``batch_size * mega_batch_mult``
    indices, each sorted by length, longest first (so batches pad little); the mega-batch that
    holds the longest example goes first, so a too-large batch fails at the first step. The
    order changes every epoch and is the same for the same seed and epoch; several processes
    share it, and a resumed run continues it mid-epoch
    (:class:`~melora_lit.training.resume.ResumableSampler`).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 42, mega_batch_mult: int = 50,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batch_mult = mega_batch_mult
        super().__init__(self.lengths, seed, num_replicas, rank)

    def epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = max(self.batch_size * self.mega_batch_mult, 1)
        megas = [sorted(perm[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(perm), size)]
        if megas:
            first = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
            megas[0], megas[first] = megas[first], megas[0]
        return [i for mega in megas for i in mega]


class PromptFormatter:
    """Records -> prompt text and token ids, for one tokenizer and prompt format.

    ``encode`` builds ``prompt_ids + response_ids + [EOS]``: the prompt and the response are
    tokenized apart, so the boundary between them is exact and ``predict`` feeds the model the very
    prompt ids it was trained on. Alpaca prompts get the BOS token the tokenizer adds (Llama) and
    never an EOS; chat prompts are the template's text, special tokens included. A chat response is
    what the template adds for the assistant's turn (the output and the end-of-turn marker); EOS
    is appended unless that already contains it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str = "alpaca",
                 system_prompt: str | None = None, train_on_inputs: bool = False, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.train_on_inputs = train_on_inputs
        self.max_length = max_length
        bos = tokenizer.bos_token_id
        self.bos = [bos] if prompt_format == "alpaca" and bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []

    def prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
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

    @property
    def check_template(self):
        """A check that the chat template fits (raises a one-line ValueError); None for alpaca."""
        if self.prompt_format == "alpaca":
            return None
        return lambda i, x, o: self.response(i, x, o, self.prompt(i, x))

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [self.bos + x for x in ids] if self.bos else ids

    def encode(self, records: dict[str, list[str]], with_labels: bool = True) -> dict[str, list]:
        """Token ids, attention masks and (with_labels) labels of a batch of records, without
        the records whose prompt leaves no room for a response token in ``max_length``."""
        prompts = [self.prompt(i, x) for i, x in zip(records["instruction"], records["input"])]
        prompt_ids = self.prompt_ids(prompts)
        if not with_labels:
            return {"input_ids": prompt_ids, "attention_mask": [[1] * len(p) for p in prompt_ids]}
        responses = [self.response(i, x, o, p)
                     for i, x, o, p in zip(records["instruction"], records["input"], records["output"], prompts)]
        response_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p, r in zip(prompt_ids, response_ids):
            if self.prompt_format == "alpaca" or eos not in r:
                r = [*r, eos]
            room = self.max_length - len(p)
            if room < 1:
                continue
            r = r[:room]
            out["input_ids"].append(p + r)
            out["attention_mask"].append([1] * (len(p) + len(r)))
            out["labels"].append((list(p) if self.train_on_inputs else [IGNORE_INDEX] * len(p)) + r)
        return out


class InstructionDataModule(MELoRADataModule):
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
    to learn from and is dropped (counted in the log and in :attr:`dropped`).

    Without a validation file, a seeded ``val_size`` of the train records is held out. Batches are
    padded to their longest sequence (``DataCollatorForSeq2Seq``: labels padded with -100), on the
    right for training and on the left for ``predict``, whose batches hold the prompts only, for
    generation. A tokenizer without a pad token pads with its EOS token.

    Args:
        train_file: Train records (``.json``, ``.jsonl``, ``.csv`` or ``.parquet``).
        validation_file: Validation records (default: ``val_size`` of the train records).
        predict_file: Instructions to answer with ``predict``: records with an instruction column
            (and optionally input), or a ``.txt`` file with one instruction per line.
        dataset_name: A hub dataset to use instead of ``train_file`` (e.g. ``yahma/alpaca-cleaned``).
        dataset_config_name: Configuration of ``dataset_name``.
        dataset_split: Split of ``dataset_name`` that holds the train records.
        instruction_column: Column of the instructions.
        input_column: Column of the inputs (the optional context); missing or empty = no input.
        output_column: Column of the responses.
        prompt_format: ``alpaca`` (the Stanford Alpaca template) or ``chat`` (the tokenizer's chat
            template).
        system_prompt: System message for ``prompt_format: chat`` (default: the template's own).
        train_on_inputs: Also put the loss on the prompt tokens (as the paper's code can).
        val_size: Records held out for validation when there is no validation file: a number of
            records (int) or a fraction (float in (0, 1)).
        group_by_length: Batch training records of similar length together (seeded, in shuffled
            mega-batches of 50 batches), which saves padding.
        tokenizer: Tokenizer hub name or local path (the CLI links the model's here).
        max_length: Longest token sequence (prompt + response + EOS); the paper's code uses 256.
        batch_size: Train batch size.
        eval_batch_size: Batch size for validation, test and predict (default: batch_size).
        max_train_samples: Train on a seeded random subset of this many records.
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split, the train subset and the train order.
        cache_dir: Folder for the datasets cache (default: the Hugging Face datasets cache).
    """

    model_task: ClassVar[DataTask] = "causal-lm"

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        predict_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        dataset_split: str = "train",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        prompt_format: Literal["alpaca", "chat"] = "alpaca",
        system_prompt: str | None = None,
        train_on_inputs: bool = False,
        val_size: int | float = 0.05,
        group_by_length: bool = False,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer, max_length, batch_size, eval_batch_size, max_train_samples, num_workers, seed, cache_dir
        )
        if prompt_format not in ("alpaca", "chat"):
            raise ValueError(f"prompt_format={prompt_format!r} is not valid; use 'alpaca' or 'chat'")
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
            raise ValueError(f"val_size must be a number of records or a fraction, got {val_size!r}")
        if isinstance(val_size, float) and not 0 < val_size < 1:
            raise ValueError(f"val_size={val_size} is not valid; a fraction must be in (0, 1)")
        if isinstance(val_size, int):
            check_int("val_size", val_size, minimum=1)
        if dataset_name is not None and train_file is not None:
            raise ValueError(f"pass either dataset_name ({dataset_name!r}) or train_file, not both")
        for path in (train_file, validation_file):
            if path is not None and Path(path).suffix.lower() not in _RECORD_FORMATS:
                raise ValueError(f"unsupported data file type {Path(path).suffix or '(no extension)'!r} for {path}; "
                                 f"use one of {', '.join(_RECORD_FORMATS)}")
        if predict_file is not None and Path(predict_file).suffix.lower() not in (*_RECORD_FORMATS, ".txt"):
            raise ValueError(f"unsupported predict file type {Path(predict_file).suffix or '(no extension)'!r}; "
                             f"use one of {', '.join(_RECORD_FORMATS)}, .txt")
        self.train_file = train_file
        self.validation_file = validation_file
        self.predict_file = predict_file
        self.dataset_name = dataset_name
        self.dataset_config_name = dataset_config_name
        self.dataset_split = dataset_split
        self.instruction_column = instruction_column
        self.input_column = input_column
        self.output_column = output_column
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.train_on_inputs = train_on_inputs
        self.val_size = val_size
        self.group_by_length = group_by_length
        self.dropped: dict[str, int] = {}
        self._fit_splits: tuple[Dataset, Dataset] | None = None
        self._prompt_tokenizer: PreTrainedTokenizerBase | None = None

    # ---- the contract (melora_lit.data.base) ------------------------------------------------

    @property
    def num_labels(self) -> None:
        """None: a causal LM predicts tokens, not classes."""
        return None

    @property
    def label_names(self) -> None:
        """None: no classes."""
        return None

    def build_metrics(self) -> MetricCollection:
        """Token-weighted ``loss`` and ``perplexity`` (see :func:`~melora_lit.training.metrics.language_modeling_metrics`)."""
        return language_modeling_metrics()

    # ---- reading --------------------------------------------------------------------------

    def _read_records(self, path: str) -> Dataset:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(not_found("data file", path))
        if file.stat().st_size == 0:
            raise ValueError(f"data file is empty: {path}")
        if file.suffix.lower() != ".parquet":
            check_utf8(path)  # the JSON reader would take other bytes silently
        if file.suffix.lower() == ".txt":
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
            lines = [line for line in lines if line]
            if not lines:
                raise ValueError(f"{path} has no instructions")
            return Dataset.from_dict({self.instruction_column: lines})
        try:
            ds = load_dataset(_RECORD_FORMATS[file.suffix.lower()], data_files=str(file.resolve()),
                              split="train", cache_dir=self.cache_dir)
        except Exception as err:  # parser errors come wrapped in several types
            if "corresponds to no data" in str(err):
                raise ValueError(f"{path} has no rows") from err
            raise ValueError(data_file_error(path, err)) from err
        if len(ds) == 0:
            raise ValueError(f"{path} has no rows")
        return ds

    def _read_hub(self) -> Dataset:
        try:
            return load_dataset(self.dataset_name, self.dataset_config_name, split=self.dataset_split,
                                cache_dir=self.cache_dir)
        except Exception as err:  # the hub raises many types; all mean "cannot get it"
            raise ValueError(f"cannot load dataset {self.dataset_name!r} split {self.dataset_split!r}: "
                             f"{describe(err)}") from err

    def _read_train(self) -> Dataset:
        """The train records as read; subclasses with their own data override this."""
        if self.train_file is not None:
            return self._read_records(self.train_file)
        if self.dataset_name is not None:
            return self._read_hub()
        raise ValueError("no train data: pass --data.train_file or --data.dataset_name")

    def _normalize(self, ds: Dataset, source: str, with_output: bool = True) -> Dataset:
        """Columns ``instruction``, ``input`` and (with_output) ``output`` as strings; an
        instruction column is required, a missing input column means no inputs."""
        required = [self.instruction_column] + ([self.output_column] if with_output else [])
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            raise ValueError(f"{source} has no column(s) {missing}; its columns are {ds.column_names}")
        cols = {"instruction": self.instruction_column, "input": self.input_column, "output": self.output_column}
        if not with_output:
            cols.pop("output")

        first = self.instruction_column

        def convert(batch: dict[str, list]) -> dict[str, list]:
            n = len(batch[first])
            out = {}
            for key, col in cols.items():
                values = batch[col] if col in batch else [""] * n
                out[key] = ["" if v is None else str(v) for v in values]
            return out

        drop = [c for c in cols.values() if c in ds.column_names and c not in cols]
        return ds.map(convert, batched=True, remove_columns=drop, desc="Reading records")

    def _fit(self) -> tuple[Dataset, Dataset]:
        if self._fit_splits is None:
            train = self._normalize(self._read_train(), self._describe_train())
            if self.validation_file is not None:
                val = self._normalize(self._read_records(self.validation_file), self.validation_file)
            else:
                size = self.val_size
                if isinstance(size, int) and size >= len(train):
                    raise ValueError(f"val_size={size} leaves no train records of {len(train)}")
                parts = train.train_test_split(test_size=size, seed=self.seed)
                train, val = parts["train"], parts["test"]
            self._fit_splits = (train, val)
        return self._fit_splits

    def _describe_train(self) -> str:
        if self.train_file is not None:
            return self.train_file
        return f"dataset {self.dataset_name!r} split {self.dataset_split!r}"

    def _train_split(self) -> Dataset:
        return self._fit()[0]

    def _record_settings(self) -> dict[str, Any]:
        """The settings that decide what a record holds."""
        return {"columns": [self.instruction_column, self.input_column, self.output_column]}

    def _train_source(self) -> tuple[list[Any], dict[str, Any]]:
        """Where the train records are read from, and the settings that choose them."""
        if self.train_file is not None:
            return [self.train_file], {}
        return [self._read_hub()], {"dataset": self.dataset_name, "config": self.dataset_config_name,
                                    "split": self.dataset_split}

    def _data_sources(self) -> dict[str, tuple[list[Any], dict[str, Any]]]:
        sources, settings = self._train_source()
        settings = {**self._record_settings(), **settings, "seed": self.seed}
        train = {**settings, "max_train_samples": self.max_train_samples}
        if self.validation_file is not None:
            return {"train": (sources, train), "val": ([self.validation_file], self._record_settings())}
        split = {"val_size": self.val_size}
        return {"train": (sources, {**train, **split}), "val": (sources, {**settings, **split, "held_out_of": "train"})}

    def _val_splits(self) -> list[Dataset]:
        return [self._fit()[1]]

    def _test_splits(self) -> list[Dataset]:
        return self._val_splits()

    def _predict_split(self) -> Dataset:
        if self.predict_file is not None:
            return self._normalize(self._read_records(self.predict_file), self.predict_file, with_output=False)
        return self._val_splits()[0]

    # ---- prompts and tokens ---------------------------------------------------------------

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = super()._load_tokenizer()
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError(f"tokenizer {self.tokenizer_name!r} has neither a pad nor an EOS token")
                tokenizer.pad_token = tokenizer.eos_token
                rank_zero_info(f"tokenizer {self.tokenizer_name!r} has no pad token: padding with its EOS "
                               f"token {tokenizer.eos_token!r} (padding is masked out of attention and loss)")
            if tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer {self.tokenizer_name!r} has no EOS token to end responses with")
            if self.prompt_format == "chat" and not tokenizer.chat_template:
                raise ValueError(f"prompt_format='chat' needs a tokenizer with a chat template; "
                                 f"{self.tokenizer_name!r} has none (use prompt_format: alpaca)")
            tokenizer.padding_side = "right"
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def formatter(self) -> "PromptFormatter":
        """Turns records into prompts and token ids with this module's settings."""
        return PromptFormatter(self._load_tokenizer(), self.prompt_format, self.system_prompt,
                               self.train_on_inputs, self.max_length)

    def format_prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field name
        """The prompt text of a record, ending where the response begins."""
        return self.formatter.prompt(instruction, input)

    def _tokenize(self, ds: Dataset, with_labels: bool = True, split: str = "train") -> Dataset:
        """Token ids (and labels) of normalized records; records with no room for a response token
        are dropped and counted in :attr:`dropped` under ``split``."""
        formatter = self.formatter
        check = formatter.check_template
        if check is not None and len(ds):
            check(ds[0]["instruction"], ds[0]["input"], ds[0].get("output", "x"))

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return formatter.encode(batch, with_labels)

        tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")
        if with_labels:
            dropped = len(ds) - len(tokenized)
            self.dropped[split] = dropped
            if dropped:
                rank_zero_info(f"{split}: dropped {dropped} of {len(ds)} records whose prompt fills max_length="
                               f"{self.max_length} tokens (no response token left to learn from)")
            if len(tokenized) == 0:
                raise ValueError(f"every {split} record's prompt fills max_length={self.max_length}; "
                                 "raise max_length")
        return tokenized

    # ---- batches --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Training batches: seeded shuffle (or length grouping), right-padded, labels padded -100."""
        ds = self._ready(self.train_dataset, "fit")
        if not self.group_by_length:
            return self._loader(ds, self.batch_size, shuffle=True)
        lengths = [len(x) for x in ds["input_ids"]]
        sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        return self._loader(ds, self.batch_size, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        """Prompt batches, left-padded for generation, in the order of :attr:`raw_predict`."""
        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = copy.deepcopy(self._load_tokenizer())
            self._prompt_tokenizer.padding_side = "left"
        return self._loader(self._ready(self.predict_dataset, "predict"), self.eval_batch_size,
                            collate_fn=DataCollatorWithPadding(self._prompt_tokenizer))

    def _collator(self) -> DataCollatorForSeq2Seq:
        return DataCollatorForSeq2Seq(self._load_tokenizer(), padding=True, label_pad_token_id=IGNORE_INDEX)


def chitchat_path() -> str:
    """The conversations file that the ``chitchat-dataset`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("chit-chat data needs the chitchat-dataset package: pip install chitchat-dataset")
    return str(Path(next(iter(spec.submodule_search_locations))) / "dataset.json")


def chitchat_pairs(context_turns: int = 0, path: str | None = None) -> Iterator[dict[str, str]]:
    """Prompt -> reply records from the Chit-Chat Challenge conversations (BYU PCC lab) that the
    PyPI package ``chitchat-dataset`` ships: for every message after the first, ``instruction`` is
    the message it answers, ``input`` the ``context_turns`` messages before that (oldest first, one
    per line; empty for 0), ``output`` the message. A message is its sender's consecutive
    utterances joined by spaces. Conversations in file order."""
    with open(path or chitchat_path(), encoding="utf-8") as f:
        conversations = json.load(f)
    for conv in conversations.values():
        turns = [" ".join(u["text"].strip() for u in message).strip() for message in conv["messages"]]
        turns = [t for t in turns if t]
        for i in range(1, len(turns)):
            context = turns[max(0, i - 1 - context_turns):i - 1] if context_turns else []
            yield {"instruction": turns[i - 1], "input": "\n".join(context), "output": turns[i]}


class ChitChatDataModule(InstructionDataModule):
    """Open-domain chit-chat as instruction data, offline: 7,168 real conversations (about 132k
    prompt -> reply pairs) of the BYU PCC lab's Chit-Chat Challenge, shipped by the PyPI package
    ``chitchat-dataset`` (``pip install chitchat-dataset``).

    Every reply becomes a record whose instruction is the message it answers (see
    :func:`chitchat_pairs`). ``max_records`` keeps a seeded random subset of the pairs (before the
    validation split), which keeps a CPU run short. Everything else is as in
    :class:`InstructionDataModule`; ``prompt_format: chat`` suits a chat model.

    Args:
        max_records: Use a seeded random subset of this many pairs (default: all).
        context_turns: Earlier messages given as the record's input, oldest first (0: none).
        prompt_format: ``alpaca`` or ``chat`` (see :class:`InstructionDataModule`).
        system_prompt: System message for ``prompt_format: chat``.
        train_on_inputs: Also put the loss on the prompt tokens.
        val_size: Pairs held out for validation: a count or a fraction.
        group_by_length: Batch pairs of similar length together.
        predict_file: Messages to reply to with ``predict`` (records or ``.txt``, one per line).
        tokenizer: Tokenizer hub name or local path (the CLI links the model's here).
        max_length: Longest token sequence.
        batch_size: Train batch size.
        eval_batch_size: Batch size for validation, test and predict (default: batch_size).
        max_train_samples: Train on a seeded random subset of this many of the training pairs.
        num_workers: DataLoader worker processes.
        seed: Seed of the subset, the validation split and the train order.
        cache_dir: Folder for the datasets cache of ``predict_file``.
    """

    def __init__(
        self,
        max_records: int | None = None,
        context_turns: int = 0,
        prompt_format: Literal["alpaca", "chat"] = "alpaca",
        system_prompt: str | None = None,
        train_on_inputs: bool = False,
        val_size: int | float = 0.05,
        group_by_length: bool = False,
        predict_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        check_int("max_records", max_records, minimum=2, optional=True)
        check_int("context_turns", context_turns, minimum=0)
        super().__init__(
            predict_file=predict_file, prompt_format=prompt_format, system_prompt=system_prompt,
            train_on_inputs=train_on_inputs, val_size=val_size, group_by_length=group_by_length,
            tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
            max_train_samples=max_train_samples, num_workers=num_workers, seed=seed, cache_dir=cache_dir,
        )
        self.max_records = max_records
        self.context_turns = context_turns

    def _describe_train(self) -> str:
        return "the chitchat-dataset conversations"

    def _train_source(self) -> tuple[list[Any], dict[str, Any]]:
        return [chitchat_path()], {"max_records": self.max_records, "context_turns": self.context_turns}

    def _read_train(self) -> Dataset:
        records = list(chitchat_pairs(self.context_turns))
        records = seeded_subset(records, self.max_records, self.seed)
        return Dataset.from_dict({k: [r[k] for r in records] for k in ("instruction", "input", "output")})

