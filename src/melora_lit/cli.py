"""``melora-lit``: LightningCLI with fit, validate, test and predict, plus ``export`` (a merged
model, the adapter or a PEFT LoRA adapter from a checkpoint; see :mod:`melora_lit.export`).

Without ``--config`` the packaged quickstart config (MiniLM on BBC News, offline) is used.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from .adapter import cpu_kernels
from .training.prediction import PredictionWriter
from .training.module import MELoRAModule
from .training.monitoring import BestMetricHParams, MELoRADiagnostics, TokenThroughputMonitor
from .sources import gguf_source
from .training.checkpoints import EXIT_PREEMPTED, ResumableCheckpoint, check_checkpoint_file
from .training.guards import NonFiniteGuard
from .training.resume import ExactResume

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def quickstart_config() -> str:
    """Path of the packaged quickstart config (also at ``configs/quickstart.yaml``)."""
    return str(resources.files("melora_lit") / "configs" / "quickstart.yaml")


class MELoRACLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, configurable as --checkpoint.*, --lr_monitor.*, --prediction_writer.*
        # ModelCheckpoint's arguments; writes are atomic, --checkpoint.every_n_train_steps N also
        # rewrites last.ckpt every N steps, SIGTERM/SIGUSR1 save it (melora_lit.training.checkpoints)
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")  # --nan_guard.action stop|skip
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        # TensorBoard monitoring (tags: melora_lit.training.monitoring): --diagnostics.*, --throughput.*, --hp_metric.*
        parser.add_lightning_class_args(MELoRADiagnostics, "diagnostics")
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        parser.add_lightning_class_args(BestMetricHParams, "hp_metric")
        # The tokenizer is the backbone's; the label set is the data's.
        parser.link_arguments(("model.model_name_or_path", "model.gguf_file"), "data.init_args.tokenizer",
                              compute_fn=gguf_source)
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.error = _one_line_parser_error  # type: ignore[method-assign]
        return parser

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("ckpt_path") == "last":
            self._resume_latest_run()
        self._check_ckpt_path(self.config_init[self.subcommand].get("ckpt_path"))  # "last", resolved

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hparams (weights_only=True) before anything else: a
        # truncated, foreign or unsafe file gets a one-line error naming it, not a traceback
        self._check_ckpt_path(self.config.get(self.config.get("subcommand") or "", {}).get("ckpt_path"))
        super()._parse_ckpt_path()

    @staticmethod
    def _check_ckpt_path(path: str | None) -> None:
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
            check_checkpoint_file(path)

    def after_fit(self) -> None:
        # fit prints no metrics table (validate does): say where the run ended
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                       if k.startswith("val") and getattr(v, "numel", lambda: 1)() == 1}
            if metrics:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
                print(f"melora-lit: after {self.trainer.global_step} steps: {shown}", file=sys.stderr)

    def _resume_latest_run(self) -> None:
        """Make ``--ckpt_path last`` find the newest run's ``last.ckpt`` and log into that run.

        Lightning looks for ``last`` only in the new run's own (empty) version folder.
        """
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            return
        root = Path(logger.root_dir)
        found = sorted(root.glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"melora-lit: no last checkpoint under {root}; starting a new run", file=sys.stderr)
            return
        last = found[-1]
        version = last.parent.parent.name
        logger._version = int(version.split("_", 1)[1]) if version.split("_", 1)[1].isdigit() else version
        self.config_init[self.subcommand]["ckpt_path"] = str(last)
        print(f"melora-lit: resuming from {last}", file=sys.stderr)


def _with_default_config(args: list[str]) -> list[str]:
    """Put the quickstart config under a subcommand that was given no ``--config``."""
    if args and args[0] in SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in args):
        if not any(a in ("-h", "--help") for a in args):
            return [args[0], "--config", quickstart_config(), *args[1:]]
    return args


_EXPORT_HELP = ("melora-lit export --ckpt_path CKPT --output_dir DIR [--format merged|adapter|peft|all]: "
                "a merged transformers model, the adapter or a PEFT LoRA adapter from a checkpoint "
                "(melora-lit export --help). melora-lit report RUN_DIR [RUN_DIR ...] --output DIR: a Markdown "
                "table and a plot comparing runs (melora-lit report --help)")


def cli_main(args: list[str] | None = None, run: bool = True) -> MELoRACLI:
    """Build (and by default run) the CLI; ``args`` as on the command line.

    ``export`` is handled apart from LightningCLI (it trains nothing): it returns the
    ``{format: folder}`` that :func:`melora_lit.export.export_checkpoint` wrote. So is ``report``
    (:func:`melora_lit.report.report_main`): it returns the ``{kind: file}`` it wrote.
    """
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "export":
        from .export import export_main

        return export_main(args[1:])  # type: ignore[return-value]
    if args and args[0] == "evaluate":  # lm-evaluation-harness tasks
        from .evaluate import evaluate_main

        return evaluate_main(args[1:])  # type: ignore[return-value]
    if args and args[0] == "report":
        from .report import report_main

        return report_main(args[1:])  # type: ignore[return-value]
    args = _with_default_config(args)
    return MELoRACLI(
        MELoRAModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": _EXPORT_HELP},
        # always on, not configurable: RNG states and the loader position, back on resume
        trainer_defaults={"callbacks": [ExactResume()]},
        args=args,
        run=run,
    )


def main() -> None:
    # main passes the (possibly completed) command line as `args`; that is intended here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        cpu_kernels.kernels_setting()  # a bad MELORA_LIT_CPU_KERNELS fails here, not at the first step
        cli_main()
    except SIGTERMException:
        # SIGTERM/SIGUSR1: ResumableCheckpoint saved last.ckpt and said so (docs/multinode.md)
        sys.exit(EXIT_PREEMPTED)
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("MELORA_LIT_DEBUG"):
            raise
        print(f"melora-lit: error: {_error_line(str(err)) or type(err).__name__}", file=sys.stderr)
        sys.exit(2)


def _error_line(text: str) -> str:
    """The line of an error message that says what is wrong: the first, except for
    jsonargparse's union report, whose first line says only that no type fitted."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Does not validate against any of the"):
        reasons = [line[2:] for line in lines if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        if reasons:
            return re.sub(r"^config: ", "", reasons[0])
    return lines[0]


def _one_line_parser_error(message: str, ex: Exception | None = None) -> None:
    """jsonargparse's error, as one ``melora-lit: error:`` line (its own is usage plus a
    multi-line report), exit status 2 as before."""
    if os.environ.get("MELORA_LIT_DEBUG"):
        print(message, file=sys.stderr)
    print(f"melora-lit: error: {_parser_message(message)}", file=sys.stderr)
    sys.exit(2)


def _parser_message(message: str) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    head = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0])
    if head is None:
        return lines[0]
    key, rest = head.groups()
    text = "\n".join([rest, *lines[1:]])
    given = re.search(r"(?:Given|Got) value:\s*(.*)", text)
    # the allowed names, from the Literal types jsonargparse tried
    choices: list[str] = []
    for inner in re.findall(r"Expected a typing\.Literal\[(.*?)\](?:\.|$)", text, flags=re.M):
        choices += [c for c in (x.strip().strip("'") for x in inner.split(",")) if c and c not in choices]
    if given is not None:
        hint = f"; use one of {', '.join(choices)}" if choices else f": {(rest or lines[1]).split('. Got')[0]}"
        return f"{key}={given.group(1).strip()!r} is not valid{hint}"
    return f"{key}: {_error_line(text)}"


if __name__ == "__main__":
    main()
