"""The catalogue of user mistakes (docs/errors.md): each one, given to the real ``melora-lit``
process, gives exactly one ``melora-lit: error:`` line naming the bad value, no traceback,
exit status 2, and leaves an earlier run's folder as it was.

The cases run as concurrent processes (each is mostly interpreter start-up); the table in
docs/errors.md must show each case's actual message, with the test's folder written ``$WORK``.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from support import run_cli, sentiment_rows, write_config, write_csv

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    # another backbone (hidden 64, not 32) for the adapter that does not fit
    from transformers import AutoTokenizer, BertConfig, BertModel

    other = w / "bert-hidden64"
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(other)
    AutoTokenizer.from_pretrained(dropout_bert).save_pretrained(other)
    return {"dir": w, "cfg": cfg, "run": run, "last": last, "other": other, "before": _tree(run)}


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
}


@pytest.fixture(scope="module")
def results(work) -> dict:
    w = str(work["dir"])

    def one(case: str):
        args, _ = CASES[case]
        args = [a.replace("$WORK", w) for a in args]
        if args[0] != "export":
            args = [args[0], "--config", str(work["cfg"]), *args[1:]]
        return run_cli(*args, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(CASES, pool.map(one, CASES)))
    return procs


def _message(proc, work) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0][len("melora-lit: error: "):].replace(str(work["dir"]), "$WORK")


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_gives_one_line_exit_2_and_touches_nothing(case, results, work):
    proc = results[case]
    message = _message(proc, work)
    print(f"{case}: {message}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert CASES[case][1] in message
    assert _tree(work["run"]) == work["before"]  # the earlier run is as it was


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
        assert rows[case] == _message(results[case], work).replace("|", "\\|"), case
