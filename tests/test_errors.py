"""The catalogue of user mistakes and machine faults (docs/errors.md): each one, given to
``melora-lit``, gives exactly one ``melora-lit: error:`` line naming the bad value, no
traceback, exit status 2 (74 for a full disk), and leaves an earlier run's folder as it was.

The mistakes run through ``main`` in the test process, the full disk as a real process; the table in
docs/errors.md must show each case's actual message, with the test's folder written ``$WORK``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import yaml

from support import melora_env, run_cli, run_main, sentiment_rows, tree_hashes, write_config, write_csv

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@pytest.fixture(scope="module")
def work(tmp_path_factory, dropout_bert) -> dict:
    from melora_lit.cli import cli_main

    w = tmp_path_factory.mktemp("errors")
    rows = sentiment_rows(40, seed=5)
    train = write_csv(w / "train.csv", rows)
    write_csv(w / "no_label_column.csv", [{"review": r["review"], "stars": 3} for r in rows])
    write_csv(w / "unknown_label.csv", [*rows[:10], {"review": "a so-so film", "sentiment": "neutral"}])
    (w / "empty.csv").write_text("review,sentiment\n")
    cfg = write_config(w / "config.yaml", dropout_bert, train, w / "runs",
                       trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
    cli_main(["fit", "--config", str(cfg)])  # the earlier run that no mistake may touch
    run = w / "runs" / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    (w / "truncated.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"weight": torch.zeros(2)}, w / "plain_state_dict.pt")
    _write_bad_inputs(w, rows, last)
    # another backbone (hidden 64, not 32) for the adapter that does not fit
    from transformers import AutoTokenizer, BertConfig, BertModel

    other = w / "bert-hidden64"
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(other)
    AutoTokenizer.from_pretrained(dropout_bert).save_pretrained(other)
    # a copy of the run that a resume under a full disk must leave as it was
    shutil.copytree(run, w / "full_disk_runs" / "lightning_logs" / "version_0")
    copy = w / "full_disk_runs" / "lightning_logs" / "version_0" / "checkpoints"
    return {"dir": w, "cfg": cfg, "run": run, "last": last, "other": other, "before": tree_hashes(run),
            "copy": copy, "copy_before": tree_hashes(copy)}


def _write_bad_inputs(w: Path, rows: list[dict], last: Path) -> None:
    """The files of the cases added for issue 17 (each named in CASES)."""
    ckpt = torch.load(last, weights_only=True)
    lora_a = next(k for k in ckpt["state_dict"] if "lora_A" in k)
    ckpt["state_dict"][lora_a].view(-1)[0] = float("nan")
    torch.save(ckpt, w / "nan_lora_a.ckpt")
    ckpt["state_dict"][lora_a].view(-1)[0] = 0.0
    ckpt["hyper_parameters"]["model_name_or_path"] = "models/bert"  # trained elsewhere, from a relative path
    torch.save(ckpt, w / "relative_source.ckpt")
    write_csv(w / "long.csv", [{"review": (r["review"] + " ") * 30, "sentiment": r["sentiment"]} for r in rows])
    records = [{"review": r["review"], "sentiment": r["sentiment"]} for r in rows]
    lines = [json.dumps({**r, "sentiment": [int(r["sentiment"] == "positive")]}) for r in records]
    (w / "list_labels.jsonl").write_text("\n".join(lines) + "\n")
    lines = [json.dumps({**r, "sentiment": i % 2 if i % 3 else r["sentiment"]}) for i, r in enumerate(records)]
    (w / "mixed_labels.jsonl").write_text("\n".join(lines) + "\n")
    csv_lines = ["review,sentiment", *(f"{r['review']},{r['sentiment']}" for r in records)]
    latin1 = csv_lines.copy()
    latin1[5] = latin1[5].replace(",", " café,", 1)
    (w / "latin1.csv").write_bytes(("\n".join(latin1) + "\n").encode("latin-1"))
    extra = csv_lines.copy()
    extra[3] += ",extra,more"
    (w / "extra_field.csv").write_text("\n".join(extra) + "\n")
    lines = [json.dumps(r) for r in records]
    (w / "truncated.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])  # a cut last line
    write_csv(w / "bool_labels.csv", [{"review": r["review"], "sentiment": str(r["sentiment"] == "positive").lower()}
                                      for r in records])
    (w / "not_a_model").mkdir()
    (w / "not_a_model" / "notes.txt").write_text("weights elsewhere")
    glue = w / "glue" / "RTE"
    glue.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (glue / name).write_text("index\tsentence1\tsentence2\tlabel\n"
                                 + "".join(f"{i}\ta cat\ta dog\tmaybe\n" for i in range(8)))
    config = yaml.safe_load((w / "config.yaml").read_text())
    config["data"] = {"class_path": "melora_lit.data.GLUEDataModule",
                      "init_args": {"task": "rte", "data_dir": str(w / "glue"), "batch_size": 8, "max_length": 32}}
    (w / "glue.yaml").write_text(yaml.safe_dump(config))
    (w / "bad_syntax.yaml").write_text("trainer:\n  max_epochs: 1\n  devices: [1\nmodel:\n  task: x\n")


# id -> (arguments, text the message must contain); "$WORK" is the test's folder
CASES: dict[str, tuple[list[str], str]] = {
    "unknown_task": (["fit", "--model.task", "translation"], "model.task='translation' is not valid"),
    "model_path_missing": (["fit", "--model.model_name_or_path", "$WORK/no-such-model"], "$WORK/no-such-model"),
    "hub_name_offline": (["fit", "--model.model_name_or_path", "some-org/some-model"], "some-org/some-model"),
    "data_file_missing": (["fit", "--data.init_args.train_file", "$WORK/no-such.csv"], "$WORK/no-such.csv"),
    "column_missing": (["fit", "--data.init_args.train_file", "$WORK/no_label_column.csv"], "'sentiment'"),
    "label_outside_label_set": (["fit", "--data.init_args.validation_file", "$WORK/unknown_label.csv"],
                                "'neutral'"),
    "empty_split": (["fit", "--data.init_args.validation_file", "$WORK/empty.csv"], "$WORK/empty.csv"),
    "melora_n_not_dividing": (["fit", "--model.melora.n", "5"], "n=5"),
    "melora_rank_zero": (["fit", "--model.melora.r", "0"], "r=0"),
    "adapter_does_not_fit_backbone": (["export", "--ckpt_path", "$WORK/runs/lightning_logs/version_0/checkpoints/"
                                       "last.ckpt", "--model_name_or_path", "$WORK/bert-hidden64", "--output_dir",
                                       "$WORK/export"], "does not fit"),
    "unknown_strategy": (["fit", "--trainer.strategy", "dpp"], "strategy='dpp'"),
    "unknown_precision": (["fit", "--trainer.precision", "17-mixed"], "trainer.precision='17-mixed'"),
    "truncated_checkpoint": (["validate", "--ckpt_path", "$WORK/truncated.ckpt"], "$WORK/truncated.ckpt"),
    "foreign_checkpoint": (["validate", "--ckpt_path", "$WORK/train.csv"], "$WORK/train.csv"),
    "not_a_melora_checkpoint": (["validate", "--ckpt_path", "$WORK/plain_state_dict.pt"], "plain_state_dict.pt"),
    "unknown_nan_guard_action": (["fit", "--nan_guard.action", "ignore"], "nan_guard.action='ignore'"),
    # issue 17
    "export_non_finite_checkpoint": (["export", "--ckpt_path", "$WORK/nan_lora_a.ckpt", "--format", "adapter",
                                      "--output_dir", "$WORK/export_nan"], "non-finite values in"),
    "max_length_over_model_limit": (["fit", "--data.init_args.max_length", "1000", "--data.init_args.train_file",
                                     "$WORK/long.csv"], "max_length=1000"),
    "root_dir_not_writable": (["fit", "--trainer.default_root_dir", "/sys/melora-lit-test"], "/sys/melora-lit-test"),
    "root_dir_is_a_file": (["fit", "--trainer.default_root_dir", "$WORK/train.csv"], "$WORK/train.csv is a file"),
    "prediction_file_not_writable": (["predict", "--ckpt_path", "$WORK/runs/lightning_logs/version_0/checkpoints/"
                                      "last.ckpt", "--prediction_writer.output_file", "/sys/melora-lit-test/p.csv"],
                                     "/sys/melora-lit-test/p.csv is not writable"),
    "prediction_file_a_device": (["predict", "--ckpt_path", "$WORK/runs/lightning_logs/version_0/checkpoints/"
                                  "last.ckpt", "--prediction_writer.output_file", "/dev/full"], "/dev/full"),
    "export_dir_not_writable": (["export", "--ckpt_path", "$WORK/runs/lightning_logs/version_0/checkpoints/last.ckpt",
                                 "--output_dir", "/sys/melora-lit-test"], "/sys/melora-lit-test is not writable"),
    "list_labels": (["fit", "--data.init_args.train_file", "$WORK/list_labels.jsonl"], "list label [0]"),
    "mixed_labels": (["fit", "--data.init_args.train_file", "$WORK/mixed_labels.jsonl"], "mixes integer and string"),
    "latin1_csv": (["fit", "--data.init_args.train_file", "$WORK/latin1.csv"], "line 6"),
    "truncated_jsonl": (["fit", "--data.init_args.train_file", "$WORK/truncated.jsonl"], "line 40"),
    "csv_extra_field": (["fit", "--data.init_args.train_file", "$WORK/extra_field.csv"], "line 4"),
    "folder_not_a_model": (["fit", "--model.model_name_or_path", "$WORK/not_a_model"], "notes.txt"),
    "relative_model_path_missing": (["export", "--ckpt_path", "$WORK/relative_source.ckpt", "--output_dir",
                                     "$WORK/export_relative"], "export --model_name_or_path"),
    "glue_labels_unparseable": (["fit", "--config", "$WORK/glue.yaml"], "'maybe'"),
    "yaml_syntax_error": (["fit", "--config", "$WORK/bad_syntax.yaml"], "$WORK/bad_syntax.yaml: YAML syntax error at line 4"),
    "melora_rank_not_integer": (["fit", "--model.melora.r", "1.5"], "model.melora.r=1.5 is not valid; use an integer"),
    "val_fraction_and_val_size": (["fit", "--data.init_args.val_fraction", "0.2"], "pass val_size only"),
    # a machine fault: the disk fills while the resumed run writes its next checkpoint (a file size
    # limit stands in for a full disk: a small filesystem needs mount privileges)
    "disk_full": (["fit", "--trainer.default_root_dir", "$WORK/full_disk_runs", "--ckpt_path", "last",
                   "--trainer.max_epochs", "2"], "File too large"),
}
STATUS = {"disk_full": 74}  # EXIT_ENVIRONMENT; every other case is a mistake: 2


@pytest.fixture(scope="module")
def results(work) -> dict:
    """Each case's exit status and output: the machine fault in a real process (a file size limit
    is a process's), the mistakes through ``melora-lit``'s ``main`` in this process (their promise
    is the line and the status, not something only a process shows)."""
    w = str(work["dir"])
    results = {}
    for case in [*CASES, *CASES_OK]:
        args, _ = {**CASES, **CASES_OK}[case]
        args = [a.replace("$WORK", w) for a in args]
        if args[0] != "export" and "--config" not in args:
            args = [args[0], "--config", str(work["cfg"]), *args[1:]]
        if case == "disk_full":  # no CPU-kernel build: its compiler would hit the file size limit, slowly
            # below a checkpoint's size (~37 kB), above the small files a run writes before it
            results[case] = run_cli(*args, cwd=w, env=melora_env(MELORA_LIT_CPU_KERNELS="0"),
                                    file_size_limit=30_000)
        else:
            results[case] = run_main(*args, cwd=w)
    return results


# not a mistake: true/false labels are class names (they were refused as booleans)
CASES_OK = {"bool_labels": (["fit", "--data.init_args.train_file", "$WORK/bool_labels.csv",
                             "--trainer.default_root_dir", "$WORK/bool_runs"], "")}


def _message(proc, work) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0][len("melora-lit: error: "):].replace(str(work["dir"]), "$WORK")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_mistake_gives_one_line_exit_2_and_touches_nothing(case, results, work):
    proc = results[case]
    message = _message(proc, work)
    print(f"{case}: {message}")
    assert proc.returncode == STATUS.get(case, 2), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert CASES[case][1] in message
    assert tree_hashes(work["run"]) == work["before"]  # the earlier run is as it was


def test_full_disk_keeps_the_checkpoints_it_had(results, work):
    assert results["disk_full"].returncode == 74
    assert tree_hashes(work["copy"]) == work["copy_before"]  # no torn or removed checkpoint, no stray temp file


def test_nothing_written_before_a_refused_output(results, work):
    # the writability checks run before the work and leave nothing behind
    assert not Path("/sys/melora-lit-test").exists()
    assert Path("/dev/full").is_char_device()
    assert not (work["dir"] / "export_nan").exists()


def test_true_false_labels_are_class_names(results, work):
    proc = results["bool_labels"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = next((work["dir"] / "bool_runs").rglob("last.ckpt"))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["hyper_parameters"]["label_names"] == ["false", "true"]


def test_hub_name_offline_says_so_and_suggests_a_local_path(results, work):
    message = _message(results["hub_name_offline"], work)
    assert "HF_HUB_OFFLINE" in message and "local" in message


def test_docs_table_shows_each_case_and_its_actual_message(results, work):
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[-1].strip("`").strip()  # `` code `` when it holds a `
    assert set(rows) == set(CASES)
    for case in CASES:
        message = _message(results[case], work)
        if case == "disk_full":  # the file being written when the disk filled: a temporary one
            assert message.startswith("cannot write $WORK/full_disk_runs/lightning_logs/version_0/checkpoints/")
            message = re.sub(r"^cannot write \S+:", "cannot write FILE:", message)
        if "/sys/melora-lit-test" in message:  # how /sys refuses a write differs between machines
            message = _READ_ONLY.sub("PERMISSION", message)
            rows[case] = _READ_ONLY.sub("PERMISSION", rows[case])
        assert rows[case] == message.replace("|", "\\|"), case


_READ_ONLY = re.compile(r"(Operation not permitted|Permission denied|Read-only file system)( \[E\w+\])?")
