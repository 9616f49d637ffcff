"""Outputs are whole or absent, never replaced without the command's overwrite flag, and never
inside inputs, checkpoints or other runs (issue 22, rule 4), with real ``melora-lit`` processes:
each refused case gives one line and exit status 2 and leaves every earlier file byte-identical,
creating nothing; a write killed or cut by a full disk leaves no output that looks complete, and
the next run removes its temporary files; staged outputs get the permissions of the umask.

The refused cases' messages are listed in docs/errors.md ("Outputs"):
``test_docs_table_shows_each_case_and_its_actual_message`` compares them.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from support import (error_line, errors_doc_rows, melora_env, melora_popen, run_cli, run_main, sentiment_rows,
                     tree_hashes, with_tests_on_path, write_config, write_csv)

ENV = {"MELORA_LIT_CPU_KERNELS": "0"}  # no kernel build in the processes (nor under a file size limit)


def _tree(folder: Path) -> dict[str, str]:
    """Every file's hash and every folder: a refused command must not even create an empty one."""
    return {**tree_hashes(folder), **{f"{p.relative_to(folder)}/": "" for p in folder.rglob("*") if p.is_dir()}}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".melora-tmp-*"))


def _tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def base(tmp_path_factory, dropout_bert) -> dict:
    """A trained run (2 steps), its data in ``data/``, a tiny RTE in the GLUE layout, and one
    earlier output of each command."""
    work = tmp_path_factory.mktemp("outputs")
    (work / "data").mkdir()
    train = write_csv(work / "data" / "train.csv", sentiment_rows(64, seed=3))
    cfg = write_config(work / "config.yaml", dropout_bert, train, work / "runs",
                       trainer={"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1})
    assert run_main("fit", "--config", str(cfg)).returncode == 0
    run = work / "runs" / "lightning_logs" / "version_0"
    words = "a cat sat on the mat with a dog".split()
    for split, n in (("train", 16), ("dev", 8)):
        _tsv(work / "glue" / "RTE" / f"{split}.tsv", [["index", "sentence1", "sentence2", "label"]] + [
            [str(i), " ".join(words[i % 3:]), " ".join(words[:5 + i % 4]), ["entailment", "not_entailment"][i % 2]]
            for i in range(n)])
    _tsv(work / "glue" / "RTE" / "test.tsv", [["index", "sentence1", "sentence2"]]
         + [[str(i), " ".join(words[i:]), " ".join(words[:i + 2])] for i in range(5)])
    glue = yaml.safe_load(cfg.read_text())
    glue["data"] = {"class_path": "melora_lit.data.GLUEDataModule", "init_args": {
        "task": "rte", "data_dir": str(work / "glue"), "batch_size": 8, "max_length": 32, "predict_split": "test"}}
    glue["trainer"]["default_root_dir"] = str(work / "glue_runs")
    (work / "glue.yaml").write_text(yaml.safe_dump(glue))
    # the earlier outputs
    (work / "old_export").mkdir()
    (work / "old_export" / "notes.txt").write_text("an earlier export\n")
    (work / "results.json").write_text("{}\n")
    (work / "old_report").mkdir()
    (work / "old_report" / "report.md").write_text("an earlier report\n")
    (work / "preds.csv").write_text("an earlier prediction\n")
    _tsv(work / "glue_submission" / "RTE.tsv", [["index", "prediction"], ["0", "entailment"]])
    return {"work": work, "cfg": cfg, "glue": work / "glue.yaml", "run": run, "model": Path(dropout_bert),
            "last": run / "checkpoints" / "last.ckpt", "train": train}


PREDICT = ["predict", "--config", "$WORK/config.yaml", "--ckpt_path", "$LAST", "--data.init_args.predict_file",
           "$WORK/data/train.csv", "--trainer.default_root_dir", "$WORK/predict_runs"]
GLUE = ["predict", "--config", "$WORK/glue.yaml", "--prediction_writer.output_file", "$WORK/glue_preds.csv"]
EXPORT = ["export", "--ckpt_path", "$LAST", "--format", "adapter", "--output_dir"]
EVALUATE = ["evaluate", "--ckpt_path", "$LAST", "--tasks", "arc_easy", "--output_path"]

# case -> (arguments, words the message must hold); $WORK: the module's folder, $RUN its trained
# run, $LAST that run's last.ckpt, $MODEL the backbone's folder
CASES: dict[str, tuple[list[str], str]] = {
    # an existing output, without the command's overwrite flag
    "export_exists": ([*EXPORT, "$WORK/old_export"], "is not empty; pass --overwrite to replace it"),
    "evaluate_exists": ([*EVALUATE, "$WORK/results.json"], "exists; pass --overwrite to replace it"),
    "report_exists": (["report", "$RUN", "--output", "$WORK/old_report"], "already holds report.md"),
    "predict_exists": ([*PREDICT, "--prediction_writer.output_file", "$WORK/preds.csv"],
                       "exists; pass --overwrite to replace it"),
    "glue_submission_exists": (GLUE, "is not empty; pass --overwrite to replace it"),
    "evaluate_extension": ([*EVALUATE, "$WORK/results.txt"], "the format follows the extension"),
    # an input, a checkpoint or another run's folder, flag or not
    "export_onto_checkpoint": ([*EXPORT, "$LAST", "--overwrite"], "is the input --ckpt_path"),
    "export_into_model": ([*EXPORT, "$MODEL/export"], "lies inside the input model_name_or_path"),
    "export_over_runs": ([*EXPORT, "$WORK/runs", "--overwrite"], "holds the input --ckpt_path"),
    "predict_onto_data": ([*PREDICT, "--prediction_writer.output_file", "$WORK/data/train.csv",
                           "--prediction_writer.overwrite", "true"], "is the input --data.init_args.train_file"),
    "predict_into_run": ([*PREDICT, "--prediction_writer.output_file", "$RUN/preds.csv"],
                         "lies inside another run's folder $RUN"),
    "glue_submission_into_data": ([*GLUE, "--prediction_writer.submission_dir", "$WORK/glue/RTE",
                                   "--prediction_writer.overwrite", "true"],
                                  "lies inside the input --data.init_args.data_dir"),
    "evaluate_into_checkpoints": ([*EVALUATE, "$RUN/checkpoints/results.json"], "lies inside the checkpoint folder"),
    "report_into_run": (["report", "$RUN", "--output", "$RUN/report"], "lies inside the input RUN_DIR"),
    # a name from a config that would leave its folder
    "checkpoint_filename": (["fit", "--config", "$WORK/config.yaml", "--trainer.default_root_dir", "$WORK/fit_runs",
                             "--checkpoint.filename", "../escape"], "checkpoint.filename='../escape'"),
}


def _args(base: dict, args: list[str]) -> list[str]:
    subs = {"$WORK": str(base["work"]), "$RUN": str(base["run"]), "$LAST": str(base["last"]),
            "$MODEL": str(base["model"])}
    return [re.sub(r"\$(WORK|RUN|LAST|MODEL)", lambda m: subs[m.group(0)], a) for a in args]


@pytest.fixture(scope="module")
def refused(base) -> dict:
    """Each case as a real process (four at a time), from the module's folder; the trees of that
    folder and of the backbone's before and after all of them."""
    before = (_tree(base["work"]), _tree(base["model"]))
    procs: dict[str, subprocess.CompletedProcess] = {}
    cases = list(CASES)
    for start in range(0, len(cases), 4):
        batch = {case: melora_popen(*_args(base, CASES[case][0]), env=melora_env(**ENV), cwd=base["work"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for case in cases[start:start + 4]}
        for case, proc in batch.items():
            out, err = proc.communicate(timeout=600)
            procs[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return {"procs": procs, "before": before, "after": (_tree(base["work"]), _tree(base["model"]))}


@pytest.mark.slow  # real melora-lit processes
@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_output_is_one_line_exit_2_and_nothing_changes(refused, base, case):
    """An existing output without the overwrite flag, an output that is or lies inside an input,
    a checkpoint or another run (or that ``--overwrite`` would replace while it holds one), an
    extension the writer does not know, a checkpoint name leaving its folder: one line naming the
    option and the path, exit 2, every earlier file byte-identical and nothing created."""
    proc = refused["procs"][case]
    message = error_line(proc)
    print(f"{case}: exit {proc.returncode}: {message}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _args(base, [CASES[case][1]])[0] in message, message
    assert refused["after"] == refused["before"]


@pytest.mark.slow  # real melora-lit processes
def test_docs_table_shows_each_case_and_its_actual_message(refused, base):
    """docs/errors.md ("Outputs") shows each refused case's actual message."""
    rows = errors_doc_rows("test_outputs.py")
    assert set(rows) == set(CASES)
    for case in CASES:
        message = error_line(refused["procs"][case]).replace(str(base["model"]), "$MODEL")
        message = message.replace(str(base["work"]), "$WORK")
        assert rows[case] == message.replace("|", "\\|"), case


# ------------------------------------------------------------------------------ staged folders
@pytest.mark.slow  # real melora-lit processes
def test_overwrite_replaces_an_export_whole(base, tmp_path):
    """``export --overwrite`` replaces the output folder whole: nothing of the earlier one is left
    (a stale file could be taken for part of the new export), and no temporary folder either."""
    out = tmp_path / "export"
    shutil.copytree(base["work"] / "old_export", out)
    proc = run_cli("export", "--ckpt_path", str(base["last"]), "--format", "adapter", "--output_dir", str(out),
                   "--overwrite", env=melora_env(**ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert _temps(tmp_path) == []


def _stale(folder: Path) -> Path:
    """A temporary folder as a killed write of a process (now gone) of this host leaves it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f".melora-tmp-{socket.gethostname()}-{dead.pid}-0badc0de"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half an export")
    return stale


@pytest.mark.slow
def test_export_under_a_full_disk_exits_74_and_leaves_no_export(base, tmp_path):
    """The disk fills (a file size limit of 200 kB: the merged model's weights are larger) while
    ``export --format all`` writes: exit status 74, one line naming the output, no output folder
    and no temporary folder; the temporary folder a killed export left is removed first."""
    stale = _stale(tmp_path)
    out = tmp_path / "export"
    proc = run_cli("export", "--ckpt_path", str(base["last"]), "--format", "all", "--output_dir", str(out),
                   env=melora_env(**ENV), file_size_limit=200_000)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert error_line(proc) == (f"cannot write {out}: File too large [EFBIG] (disk full or a size limit reached); "
                            f"nothing is left half-written (outputs are staged): free space and rerun")
    assert not stale.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_glue_submission_killed_before_its_rename_is_absent_and_cleaned_up_next_time(base, tmp_path):
    """SIGKILL once every leaderboard file is written, just before the folder is renamed into place:
    no ``glue_submission`` folder (its files exist only under a temporary name); the next predict
    removes that temporary folder and writes the submission."""
    hook = tmp_path / "kill.yaml"
    hook.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "kill_at.KillBeforeRename"}]}}))
    args = ["predict", "--config", str(base["glue"]), "--prediction_writer.output_file", str(tmp_path / "preds.csv"),
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    killed = run_cli(*args, "--config", str(hook), env=with_tests_on_path(**ENV))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "glue_submission").exists()
    [temp] = _temps(tmp_path)
    assert (tmp_path / temp / "RTE.tsv").read_text().startswith("index\tprediction\n")
    again = run_cli(*args, "--prediction_writer.overwrite", "true", env=melora_env(**ENV))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _temps(tmp_path) == [] and len((tmp_path / "glue_submission" / "RTE.tsv").read_text().splitlines()) == 6


def test_glue_file_names_come_only_from_a_glue_test_split(base, tmp_path):
    """The leaderboard file names come from the data's ``glue_file`` column: only a GLUE test split
    writes them (another file's column of that name is a column), and a name that is not a GLUE
    file is refused, nothing written."""
    from melora_lit.data.glue_submission import write_submission

    with pytest.raises(ValueError, match=r"glue_file='\.\./evil' is not a GLUE leaderboard file; the files are CoLA"):
        write_submission([{"glue_file": "../evil", "index": 0, "prediction": "x"}], tmp_path / "sub", None)
    assert list(tmp_path.iterdir()) == []
    rows = [{**r, "index": i, "glue_file": "../../evil"} for i, r in enumerate(sentiment_rows(8, seed=1))]
    data = write_csv(tmp_path / "with_glue_file.csv", rows)
    preds = tmp_path / "a" / "b" / "preds.csv"
    proc = run_cli("predict", "--config", str(base["cfg"]), "--ckpt_path", str(base["last"]),
                   "--data.init_args.predict_file", str(data), "--prediction_writer.output_file", str(preds),
                   "--trainer.default_root_dir", str(tmp_path / "runs"), env=melora_env(**ENV))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "runs" not in p.parts) \
        == ["a/b/preds.csv", "with_glue_file.csv"]


# ------------------------------------------------------------------------------ permissions
@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_staged_outputs_get_the_permissions_of_the_umask(base, tmp_path, umask):
    """Files 0o666 & ~umask, folders 0o777 & ~umask, as a plain write makes them: an export (whose
    library writes its weights 0600), a predictions file and (022) a checkpoint."""
    env = melora_env(**ENV)
    runs = [run_cli("export", "--ckpt_path", str(base["last"]), "--output_dir", str(tmp_path / "export"), env=env,
                    umask=umask),
            run_cli("predict", "--config", str(base["cfg"]), "--ckpt_path", str(base["last"]),
                    "--data.init_args.predict_file", str(base["train"]), "--prediction_writer.output_file",
                    str(tmp_path / "preds.csv"), "--trainer.default_root_dir", str(tmp_path / "runs"), env=env,
                    umask=umask)]
    if umask == 0o022:  # under 077 a temp file's 0600 is right anyway
        runs.append(run_cli("fit", "--config", str(base["cfg"]), "--trainer.default_root_dir", str(tmp_path / "fit"),
                            "--trainer.limit_train_batches", "1", env=env, umask=umask))
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    written = [tmp_path / "export", *(tmp_path / "export").rglob("*"), tmp_path / "preds.csv",
               *(tmp_path / "fit").rglob("*.ckpt")]
    assert len(written) > 10 and any(p.suffix == ".safetensors" for p in written)
    assert any(p.suffix == ".ckpt" for p in written) == (umask == 0o022)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {name: oct((0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask) for name in modes}
