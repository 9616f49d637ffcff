"""``melora-lit generate``: talk to a tuned causal LM.

The model comes from a run's checkpoint (``--ckpt_path``, rebuilt as ``export`` does:
:func:`melora_lit.export.load_checkpoint_model`) or from a folder (``--model``): a merged model
that ``melora-lit export`` wrote (or any causal LM source), or an adapter folder of
``export --format adapter`` or ``--format peft``, loaded onto the base model it names.

Prompts are ``--prompt`` texts, the lines of a ``.txt`` file or the records of a ``.jsonl`` file
(``instruction`` and ``input``, or ``messages``), each answered once; without them, a chat on
stdin that keeps the conversation. They are formatted as the run was trained: its data's
``prompt_format`` (the Stanford Alpaca template, or the tokenizer's chat template) or, for a
``ChatDataModule``, its chat template; a folder's tokenizer's chat template if it has one, else
the raw text; ``--format`` overrides. Decoding is :func:`melora_lit.training.causal_lm.generate`,
what ``predict`` runs, with its :class:`~melora_lit.training.causal_lm.GenerationOptions`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .errors import OneLineArgumentParser, data_file_error, first_line
from .run import LAST, check_output, check_protected, find_last, preemption, remove_stale_temp_files, staged

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .training.causal_lm import GenerationOptions

FORMATS = ("alpaca", "chat", "raw")
PROMPT_FILE_TYPES = (".txt", ".jsonl")
_SAMPLING = ("temperature", "top_p", "top_k")  # what greedy decoding ignores
# melora-lit's causal-LM data modules: conversations through a chat template (melora_lit.data.chat),
# and instruction records with a prompt_format (melora_lit.data.instruction)
_CHAT_DATA = ("ChatDataModule", "ChitChatConversationsDataModule")
_INSTRUCTION_DATA = ("InstructionDataModule", "ChitChatDataModule")

__all__ = ["FORMATS", "Talker", "generate_main", "read_prompt_file"]

_EXAMPLES = """examples:
  melora-lit generate --ckpt_path lightning_logs/version_1/checkpoints/last.ckpt --prompt "Name a red fruit."
  melora-lit generate --model export/merged --prompt_file questions.jsonl --output answers.jsonl
  melora-lit generate --model export/adapter --do_sample --temperature 0.7 --seed 1    # a chat on stdin

In the chat, /reset starts a new conversation; /exit or end of input (Ctrl+D) ends it."""


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="melora-lit generate", epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Talk to a tuned causal LM: answer prompts, or chat on stdin (no --prompt or --prompt_file).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", metavar="CKPT",
                        help="checkpoint of a fit run (RUN/checkpoints/last.ckpt), or 'last': the newest run's under "
                             "the --config's trainer.default_root_dir (default: the current folder)")
    source.add_argument("--model", metavar="DIR", help="a folder of melora-lit export (merged, adapter or peft) or "
                        "any causal LM source (a local folder, a hub name, a GGUF file, package:MODULE)")
    p.add_argument("--config", metavar="FILE", help="with --ckpt_path: the run's config.yaml (default: the one in the "
                   "checkpoint's run folder): its model settings where the checkpoint has none, its prompt format")
    p.add_argument("--model_name_or_path", metavar="DIR", help="load the backbone of the checkpoint or the adapter "
                   "folder from here instead of the source it records")
    prompts = p.add_argument_group("prompts (with neither --prompt nor --prompt_file: a chat on stdin)")
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt to answer (repeatable)")
    prompts.add_argument("--prompt_file", metavar="FILE", help=".txt: one prompt per line; .jsonl: records with "
                         "'instruction' (and 'input') or 'messages' ([{role, content}, ...] ending with a user turn)")
    prompts.add_argument("--format", choices=FORMATS,
                         help="alpaca: the Stanford Alpaca template; chat: the tokenizer's chat template; raw: the "
                              "text as it is. Default: as the run was trained (--ckpt_path); the tokenizer's chat "
                              "template if it has one, else raw (--model)")
    prompts.add_argument("--system_prompt", metavar="TEXT",
                         help="system message of chat prompts (default: the run's, else the template's own)")
    decoding = p.add_argument_group("decoding (transformers' generate options; greedy unless --do_sample)")
    decoding.add_argument("--max_new_tokens", type=int, default=128, metavar="N",
                          help="most tokens per reply (default: 128)")
    decoding.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")
    decoding.add_argument("--top_p", type=float,
                          help="nucleus sampling: the smallest set of tokens with this probability (default: 1.0)")
    decoding.add_argument("--top_k", type=int, help="sample among the k most likely tokens (default: 0, all)")
    decoding.add_argument("--repetition_penalty", type=float, default=1.0,
                          help="penalty on repeated tokens (default: 1.0, none)")
    decoding.add_argument("--seed", type=int, help="seed of the sampling: the same seed gives the same replies")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--show_prompt", action="store_true",
                   help="print each prompt as the model gets it (its tokens decoded) to stderr")
    p.add_argument("--output", metavar="FILE", help="write the replies to this .jsonl file (each prompt's record "
                   "plus 'response') instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def _generation_options(opts: argparse.Namespace) -> GenerationOptions:
    """The decoding options, checked before anything is loaded."""
    from .training.causal_lm import GenerationOptions

    ignored = next((k for k in _SAMPLING if getattr(opts, k) is not None), None)
    if ignored is not None and not opts.do_sample:
        raise ValueError(f"--{ignored} {getattr(opts, ignored)} needs --do_sample (greedy decoding ignores it): add "
                         f"--do_sample, or leave --{ignored} out")
    sampling = {k: getattr(opts, k) for k in _SAMPLING if getattr(opts, k) is not None}
    try:
        return GenerationOptions(max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample,
                                 repetition_penalty=opts.repetition_penalty, **sampling)
    except ValueError as err:  # "temperature=0.0 is not valid; ...": the option as typed
        raise ValueError(f"--{err}") from None


# ------------------------------------------------------------------------------ prompts
def read_prompt_file(path: str) -> list[dict[str, Any]]:
    """The prompt records of a ``.txt`` (``{"prompt": line}`` per non-empty line) or ``.jsonl``
    file (its objects, each with ``instruction`` or ``messages``); one-line errors naming the line."""
    file = Path(path).expanduser()
    if file.suffix.lower() not in PROMPT_FILE_TYPES:
        raise ValueError(f"--prompt_file={path} has the extension {file.suffix or '(none)'!r}; use one of "
                         f"{', '.join(PROMPT_FILE_TYPES)}")
    if not file.is_file():
        raise ValueError(f"--prompt_file {path} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix.lower() == ".txt":
        records = [{"prompt": line.strip()} for line in lines if line.strip()]
    else:
        records = [_record(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise ValueError(f"--prompt_file {path} holds no prompts")
    return records


def _record(path: str, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(data_file_error(path, err)) from None  # names the line
    where = f"{path} line {number}"
    if not isinstance(record, dict) or not ({"instruction", "messages"} & set(record)):
        raise ValueError(f"{where}: a prompt record needs 'instruction' (and optionally 'input') or 'messages'")
    messages = record.get("messages")
    if "messages" in record:
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{\"role\": system|user|assistant, "
                             f"\"content\": text}}")
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the conversation must end with a user turn (the model answers it)")
    elif not isinstance(record["instruction"], str) or not isinstance(record.get("input", ""), str):
        raise ValueError(f"{where}: 'instruction' and 'input' must be text")
    return record


def _user_text(record: dict[str, Any]) -> str:
    """A single-turn record as one text: the instruction, then its input (as PromptEncoder puts a
    record into a user turn)."""
    if "prompt" in record:
        return record["prompt"]
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


class Talker:
    """A causal LM, its tokenizer and the prompt format: :meth:`reply` answers a prompt record
    (``{"prompt"}``, ``{"instruction", "input"}`` or ``{"messages"}``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_format: str,
                 options: GenerationOptions, system_prompt: str | None = None, show_prompt: bool = False) -> None:
        self.model, self.tokenizer, self.format, self.options = model, tokenizer, prompt_format, options
        self.system_prompt = system_prompt
        self.show_prompt = show_prompt
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.room = positions - options.max_new_tokens if positions else None  # prompt tokens that fit
        if self.room is not None and self.room < 1:
            raise ValueError(f"--max_new_tokens={options.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{positions} token positions; use at most {positions - 1}")
        self.count = 0

    def ids(self, record: dict[str, Any]) -> list[int]:
        """The prompt's token ids, as training tokenized prompts of this format."""
        from .data.chat import ChatTemplateEncoder
        from .data.instruction import PromptEncoder

        messages = record.get("messages")
        if self.format == "chat":
            if messages is None:
                messages = [{"role": "user", "content": _user_text(record)}]
            if self.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            return ChatTemplateEncoder(self.tokenizer, max_length=sys.maxsize).encode({"messages": messages},
                                                                                    with_labels=False)["input_ids"]
        if messages is not None:  # one user turn is a prompt; a conversation needs turns
            turns = [m for m in messages if m["role"] != "system"]
            if len(turns) > 1:
                raise ValueError(f"a conversation of {len(turns)} turns needs the chat format, not {self.format} "
                                 f"(--format chat: the tokenizer's chat template)")
            record = {"prompt": turns[0]["content"]}
        if self.format == "raw":
            return self.tokenizer(_user_text(record))["input_ids"]
        instruction, text = (record["prompt"], "") if "prompt" in record else (record["instruction"],
                                                                                record.get("input", ""))
        return PromptEncoder(self.tokenizer).encode({"instruction": instruction, "input": text},
                                                    with_labels=False)["input_ids"]

    def reply(self, record: dict[str, Any]) -> str:
        import torch

        from .training.causal_lm import generate

        ids = self.ids(record)
        self.count += 1
        if self.room is not None and len(ids) > self.room:
            print(f"melora-lit: prompt {self.count} has {len(ids)} tokens and {self.room} fit before the reply: "
                  f"its first {len(ids) - self.room} are left out", file=sys.stderr)
            ids = ids[-self.room:]
        if self.show_prompt:
            print(f"melora-lit: prompt {self.count} ({len(ids)} tokens):\n{self.tokenizer.decode(ids)}",
                  file=sys.stderr, flush=True)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        return generate(self.model, self.tokenizer, self.options, input_ids, torch.ones_like(input_ids))[0]

    def chat(self, lines: Iterable[str], interactive: bool = False) -> None:
        """Answer ``lines`` (a user turn each) as one conversation, each reply on stdout; ``/reset``
        starts a new one, ``/exit`` or the end of ``lines`` ends it. The alpaca and raw formats
        have no turns: each message is answered on its own."""
        history: list[dict[str, str]] = []
        if interactive:
            print(f"melora-lit: chat ({self.format} format); /reset starts over, /exit or Ctrl+D ends",
                  file=sys.stderr)
        if self.format != "chat":
            print(f"melora-lit: the {self.format} format has no turns: each message is answered on its own "
                  f"(--format chat keeps the conversation)", file=sys.stderr)
        for line in lines:
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                history.clear()
                print("melora-lit: a new conversation", file=sys.stderr, flush=True)
                continue
            if not text:
                continue
            turn = {"role": "user", "content": text}
            reply = self.reply({"messages": [*history, turn]} if self.format == "chat" else {"prompt": text})
            history += [turn, {"role": "assistant", "content": reply}]
            print(reply, flush=True)


def _stdin_lines(interactive: bool) -> Iterable[str]:
    if not interactive:
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # not on every platform
        pass

    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return


# ------------------------------------------------------------------------------ models
def _run_prompt_format(data: Any) -> tuple[str | None, str | None, str | None]:
    """``(format, system prompt, chat template)`` of a run's ``data`` config section; the format
    is None where the data module is not one of melora-lit's causal-LM modules."""
    if not isinstance(data, dict):
        return None, None, None
    name = str(data.get("class_path", "")).rsplit(".", 1)[-1]
    args = data.get("init_args") or {}
    fmt = "chat" if name in _CHAT_DATA else args.get("prompt_format") or ("alpaca" if name in _INSTRUCTION_DATA
                                                                            else None)
    return fmt, args.get("system_prompt"), args.get("chat_template")


def _newest_checkpoint(config: str | None) -> str:
    """``--ckpt_path last``: the newest run's ``last*.ckpt`` (:func:`melora_lit.run.find_last`)
    under the config's ``trainer.default_root_dir``, else under the current folder."""
    from .export import run_config

    trainer = (run_config("", config).get("trainer") or {}) if config else {}
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    found, _ = find_last(None, root / "lightning_logs", root / "checkpoints")
    if found is None:
        raise ValueError(f"--ckpt_path last: no run under {root / 'lightning_logs'} has a last checkpoint "
                         f"(last*.ckpt); give --ckpt_path FILE, or the run's --config (its trainer.default_root_dir)")
    print(f"melora-lit: generating with {found}", file=sys.stderr)
    return str(found)


def _from_checkpoint(ckpt_path: str, config: str | None, model_name_or_path: str | None,
                     output: Path | None) -> tuple[Any, Any, tuple[str | None, str | None, str | None]]:
    """The adapted model of a checkpoint, the backbone's tokenizer and the run's prompt format."""
    from .export import load_checkpoint_model, run_config
    from .training.checkpoints import read_checkpoint
    from .training.tasks import task_class, task_names

    hparams = read_checkpoint(ckpt_path).get("hyper_parameters") or {}
    task = hparams.get("task")
    if task not in (None, *task_names()) or not task_class(task).generates:
        raise ValueError(f"checkpoint {ckpt_path} is a {hparams.get('task', 'classification')} model; generate "
                         f"talks to causal LMs (--model.task causal-lm)")
    if output is not None and model_name_or_path is None:
        check_protected(output, "--output", [("model_name_or_path recorded in the checkpoint",
                                              hparams.get("model_name_or_path"))])
    module = load_checkpoint_model(ckpt_path, config, model_name_or_path, command="generate")
    run_format = _run_prompt_format(run_config(ckpt_path, config).get("data"))
    return module.model, module.task.tokenizer(module.hparams), run_format


def _device(name: str | None) -> torch.device:
    """``--device``, checked before the model is loaded (default: cuda if available, else cpu)."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # torch says "not compiled with CUDA" as an assertion
        raise ValueError(f"--device={name} cannot be used here: {first_line(err)}") from None
    return device


def _from_folder(model: str, model_name_or_path: str | None, output: Path | None) -> tuple[Any, Any]:
    """A merged model or any causal LM source, or an adapter folder (melora-lit's or PEFT's) on
    the base model it names; and that model's tokenizer."""
    from transformers import AutoTokenizer

    from .sources import PACKAGE_PREFIX, resolve_pretrained
    from .training.causal_lm import CausalLM
    from .training.module import load_backbone

    config_file = Path(model).expanduser() / "adapter_config.json"
    if not config_file.is_file():
        if model_name_or_path is not None:
            raise ValueError(f"--model_name_or_path names the backbone of a checkpoint or an adapter folder; --model "
                             f"{model} has no adapter_config.json: it is the whole model")
        base = model
        loaded = load_backbone(model, task=CausalLM.name)
    else:
        try:
            meta = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read {config_file}: {first_line(err)}") from None
        recorded = meta.get("base_model_name_or_path")
        base = model_name_or_path or recorded
        if not base:
            raise ValueError(f"{config_file} names no base model; pass --model_name_or_path DIR")
        if model_name_or_path is None and base.startswith(PACKAGE_PREFIX):  # an adapter folder is data
            raise ValueError(f"adapter folder {model} names the base model {base!r}, which imports the Python package "
                             f"{base[len(PACKAGE_PREFIX):]!r}; only your command line may: pass "
                             f"--model_name_or_path {base} if you mean it")
        if output is not None and model_name_or_path is None:
            check_protected(output, "--output", [(f"base model recorded in {config_file}", recorded)])
        if meta.get("adapter_type") == "MELORA":
            from .adapter import load_adapter

            loaded = load_adapter(load_backbone(base, task=CausalLM.name), config_file.parent)
        elif meta.get("peft_type"):
            try:
                from peft import PeftModel
            except ImportError:
                raise ValueError(f"--model {model} is a PEFT adapter, which needs peft (pip install peft); or give "
                                 f"the adapter or merged folder of melora-lit export") from None
            loaded = PeftModel.from_pretrained(load_backbone(base, task=CausalLM.name), config_file.parent)
        else:
            raise ValueError(f"{config_file} is neither a melora-lit nor a PEFT adapter's config")
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def _prompt_format(given: str | None, run_format: str | None, tokenizer: Any, source: str) -> str:
    """``--format``, else the run's, else the tokenizer's chat template if it has one, else raw."""
    fmt = given or run_format or ("chat" if tokenizer.chat_template else "raw")
    if fmt == "chat" and not tokenizer.chat_template:
        raise ValueError(f"the chat format needs a tokenizer with a chat template; the one of {source} has none: use "
                         f"--format alpaca or raw")
    return fmt


def _talker(opts: argparse.Namespace, options: GenerationOptions, output: Path | None) -> Talker:
    """The model of ``--ckpt_path`` or ``--model``, its tokenizer and the prompt format."""
    run_format = system_prompt = None
    if opts.ckpt_path is not None:
        ckpt_path = _newest_checkpoint(opts.config) if opts.ckpt_path == LAST else opts.ckpt_path
        model, tokenizer, (run_format, system_prompt, template) = _from_checkpoint(
            ckpt_path, opts.config, opts.model_name_or_path, output)
        if template is not None:  # a ChatDataModule's named or own template
            from .data.chat import CHAT_TEMPLATES

            tokenizer.chat_template = CHAT_TEMPLATES.get(template, template)
        source = f"--ckpt_path {ckpt_path}"
        if run_format is None and opts.format is None:
            print("melora-lit: the run's config names no prompt format: the tokenizer's chat template if it has "
                  "one, else raw (--format to choose)", file=sys.stderr)
    else:
        model, tokenizer = _from_folder(opts.model, opts.model_name_or_path, output)
        source = f"--model {opts.model}"
    fmt = _prompt_format(opts.format, run_format, tokenizer, source)
    return Talker(model, tokenizer, fmt, options, opts.system_prompt or system_prompt, opts.show_prompt)


def generate_main(args: Sequence[str]) -> list[dict[str, Any]]:
    """``melora-lit generate ...`` (args after ``generate``); returns the prompt records, each
    with its ``response`` (none for a chat)."""
    preemption.install(raise_on_signal=True)  # as cli.main does: in-process callers (tests, scripts) too
    opts = _parser().parse_args(list(args))
    options = _generation_options(opts)
    if opts.config is not None and opts.model is not None:
        raise ValueError("--config is the run's config of a --ckpt_path; with --model, choose the prompt format with "
                         "--format")
    if opts.config is not None and not Path(opts.config).is_file():
        raise ValueError(f"config file not found: {opts.config}")
    chatting = not opts.prompt and opts.prompt_file is None
    if chatting and opts.output is not None:
        raise ValueError("--output writes the replies to --prompt or --prompt_file; a chat (neither given) prints them")
    output = Path(opts.output) if opts.output is not None else None
    if output is not None:  # before anything is read
        inputs = [("--ckpt_path", opts.ckpt_path), ("--config", opts.config), ("--model", opts.model),
                  ("--model_name_or_path", opts.model_name_or_path), ("--prompt_file", opts.prompt_file)]
        check_output(output, "--output", opts.overwrite, suffixes=(".jsonl",), inputs=inputs)
    records = [{"prompt": text} for text in opts.prompt or []]
    records += read_prompt_file(opts.prompt_file) if opts.prompt_file is not None else []
    device = _device(opts.device)
    talker = _talker(opts, options, output)
    talker.model.to(device).eval()
    if opts.seed is not None:
        import torch

        torch.manual_seed(opts.seed)
    if chatting:
        interactive = sys.stdin.isatty()
        talker.chat(_stdin_lines(interactive), interactive)
        return []
    answered = []
    for record in records:
        answered.append({**record, "response": talker.reply(record)})
        if output is None:
            print(answered[-1]["response"], flush=True)
    if output is not None:
        remove_stale_temp_files(output.parent)  # what a killed generate left
        with staged(output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answered)
        print(f"melora-lit: wrote {len(answered)} replies to {output}")
    return answered
