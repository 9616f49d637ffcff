"""``melora-lit``: LightningCLI with fit, validate, test and predict, plus ``export`` (a merged
model, the adapter or a PEFT LoRA adapter from a checkpoint; see :mod:`melora_lit.export`).

Without ``--config`` the packaged quickstart config (MiniLM on BBC News, offline) is used.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from . import __version__
from .adapter import cpu_kernels
from .errors import EXIT_USAGE, check_config_files, parser_message
from .run import (LAST, LAST_OR_NEW, StopOnSignal, choose_run_folder, cluster_plugins, finished_run, preemption,
                  run_command)
from .training.prediction import PredictionWriter
from .training.lr_finder import ApplyFoundLearningRate
from .training.progress import LogLineProgress, job_log_progress
from .training.module import MELoRAModule
from .training.tasks import task_class
from .training.monitoring import BestMetricHParams, MELoRADiagnostics, TokenThroughputMonitor
from .sources import gguf_source, vocabulary_size
from .training.checkpoints import (
    ResumableCheckpoint,
    RunFingerprint,
    check_fingerprints,
    check_resume,
    read_checkpoint,
    refuse_code_settings,
    use_atomic_checkpoint_io,
)
from .training.guards import NonFiniteGuard
from .training.strategies import COLLECTIVE_TIMEOUT_S, with_collective_timeout
from .training.resume import ExactResume, check_resume_checkpoint, check_resume_data

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
        # --progress.every_n_steps: plain log lines where stdout is not a terminal (instantiate_trainer)
        parser.add_class_arguments(LogLineProgress, "progress")
        # The tokenizer is the backbone's; the label set is the data's.
        parser.link_arguments(("model.model_name_or_path", "model.gguf_file"), "data.init_args.tokenizer",
                              compute_fn=gguf_source)
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        # --optimizer/--lr_scheduler become the module's callables, built after configure_model
        parser.add_optimizer_args(link_to="model.optimizer")
        parser.add_lr_scheduler_args(link_to="model.lr_scheduler")
        # in every subcommand's parser, so that a fit's config.yaml reads in validate too (it
        # holds null there: an acceptance is for one command, never carried on by a config)
        # the overwrite flag of every command (export, evaluate, report, generate: --overwrite)
        parser.add_argument("--overwrite", action="store_true",
                            help="predict: replace an existing predictions file (and a GLUE submission folder) "
                                 "instead of refusing it (the same as --prediction_writer.overwrite true)")
        part = Literal[ACCEPTABLE]  # type: ignore[valid-type]
        parser.add_argument("--accept_change", type=Optional[Union[part, list[part]]], default=None,
                            help="fit --ckpt_path: resume although the checkpoint was trained on other data or "
                                 "another backbone (refused otherwise): train_data, val_data, backbone, or a list "
                                 "([train_data, val_data])")
        parser.add_argument("--collective_timeout", type=Optional[float], default=COLLECTIVE_TIMEOUT_S,
                            help="seconds a collective operation of a multi-process run (process-group set-up "
                                 "included) waits for the other processes; past it the run ends with exit status "
                                 "75 (another process lost: restart the whole job with --ckpt_path auto). Given to "
                                 "the strategy's timeout where that is left at torch's default (1800); null keeps it")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.error = _one_line_parser_error  # type: ignore[method-assign]
        parser.add_argument("--version", action="version", version=f"melora-lit {__version__}")
        return parser

    # ------------------------------------------------------------------ run folder and resume
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, self._with_task_monitor(parser, args))
        # LightningCLI reads a --ckpt_path file's hyper-parameters next and lets them replace the
        # model settings: keep what the user typed, to put it back (before_instantiate_classes)
        cfg = self._subconfig() or {}
        self._typed_model = copy.deepcopy(cfg.get("model"))
        self._typed_keys = typed_model_keys(list(args or []), self.config.get("subcommand"))
        # a truncated, foreign or unsafe file gets a one-line error naming it, not a traceback
        path = cfg.get("ckpt_path")
        if path and path not in CKPT_KEYWORDS and "://" not in str(path):
            self._read_checkpoint(path)

    @staticmethod
    def _with_task_monitor(parser: LightningArgumentParser, args: Any) -> Any:
        """Under the packaged quickstart config, the default (a classifier's: ``val/accuracy``, max),
        the checkpoint monitor and mode of the task the command chose (``Task.default_monitor``),
        put before the user's arguments, which still win. A first parse finds the task (without
        ``--print_config``, so that the printed config is the final one)."""
        if not isinstance(args, list) or args[1:3] != ["--config", quickstart_config()]:
            return args
        found = parser.parse_args([a for a in args if not a.startswith("--print_config")])
        monitor, mode = task_class(found[f"{args[0]}.model.task"]).default_monitor
        return [*args[:3], "--checkpoint.monitor", monitor, "--checkpoint.mode", mode, *args[3:]]

    def _keep_typed_model_settings(self) -> None:
        """The command line and config win over a ``--ckpt_path`` file's hyper-parameters, which
        LightningCLI merged over them: every model setting the user typed is put back (a resume
        that it does not fit is then refused by :func:`check_resume`, a load by the shape check);
        the checkpoint fills in only what the user left at its default. A checkpoint's setting
        that would run or import code is refused (:func:`refuse_code_settings`)."""
        cfg = self._subconfig()
        typed, merged = getattr(self, "_typed_model", None), cfg.get("model") if cfg is not None else None
        if typed is None or merged is None or typed == merged:
            return
        for key in set(typed.keys()) | set(merged.keys()):
            if typed.get(key) != merged.get(key) and _is_typed(key, self._typed_keys):
                merged[key] = copy.deepcopy(typed.get(key))
        refuse_code_settings(cfg.get("ckpt_path"), merged, typed)

    def _read_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """:func:`read_checkpoint`, once per file and run (the CLI checks it at several stages)."""
        if getattr(self, "_checkpoint", (None,))[0] != str(path):
            self._checkpoint = (str(path), read_checkpoint(path))
        return self._checkpoint[1]

    def _subconfig(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config.get(subcommand) if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """The run folder, before anything is built or written (:func:`melora_lit.run.choose_run_folder`);
        the loggers are given its ``version``."""
        self._keep_typed_model_settings()
        cfg = self._subconfig()
        check_trainer_settings(cfg.get("trainer"))  # values Lightning would take with a traceback, or silently
        accept = cfg.get("accept_change") or []
        self._accept = [accept] if isinstance(accept, str) else list(accept)
        cfg["accept_change"] = None  # not saved in config.yaml
        if cfg.get("overwrite"):  # for this command only, as --accept_change
            cfg.prediction_writer.overwrite, cfg["overwrite"] = True, False
        self._choice = choose_run_folder(cfg, self.subcommand, self._read_checkpoint,
                                         is_global_zero=rank_zero_only.rank == 0)
        self._choice.restore += with_collective_timeout(cfg.get("trainer"), cfg.get("collective_timeout"))

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        for namespace, key, value in self._choice.restore:
            setattr(namespace, key, value)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self._subconfig()
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        kwargs.setdefault("callbacks", job_log_progress(config["trainer"], config.get("progress")))
        kwargs.setdefault("plugins", cluster_plugins(config["trainer"].get("plugins")))  # SLURM: melora-lit requeues
        version = self._choice.version
        if version is not None and cfg.trainer.get("logger") in (None, True) and "logger" not in kwargs:
            root = cfg.trainer.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = TensorBoardLogger(save_dir=root, version=version)  # Lightning's default
        trainer = super().instantiate_trainer(**kwargs)
        if self._choice.run_folder_logger:  # W&B, MLflow...: the run folder (config, checkpoints, metrics.csv) first
            root = cfg.trainer.get("default_root_dir") or os.getcwd()
            trainer.loggers = [CSVLogger(save_dir=root, name="lightning_logs", version=version), *trainer.loggers]
        use_atomic_checkpoint_io(trainer)
        if not trainer.loggers:  # --trainer.logger false: nothing to log learning rates to
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        return trainer

    def _check_data(self, stage: str) -> None:
        """The data of ``stage`` read and checked (files, encodings, max_length), and the tokenizer
        against the backbone's token embeddings, before the trainer writes anything."""
        from .data.base import MELoRADataModule

        if isinstance(self.datamodule, MELoRADataModule):
            self.datamodule.setup(stage)
            check_vocabulary(self.datamodule.tokenizer_name, self.datamodule.tokenizer, self.model.backbone_source)

    def before_validate(self) -> None:
        self._check_data("validate")

    def before_test(self) -> None:
        self._check_data("test")

    def before_predict(self) -> None:
        self._check_data("predict")

    def before_fit(self) -> None:
        # everything that can refuse the run, before fit writes anything into a run folder
        self._check_data("fit")
        path = self.config_init[self.subcommand].get("ckpt_path")
        done = None
        if path and path not in CKPT_KEYWORDS and "://" not in str(path):
            ckpt = self._read_checkpoint(path)
            check_resume(path, ckpt, self.model.hparams, getattr(self.datamodule, "seed", None))
            check_resume_checkpoint(ckpt, self.trainer.world_size)  # mid-epoch: the same number of processes
            from .data.base import MELoRADataModule

            ours = isinstance(self.datamodule, MELoRADataModule)  # its data was read by _check_data
            # the data and the backbone the checkpoint was trained on, then the epochs' length
            recorder = next((c for c in self.trainer.callbacks if isinstance(c, RunFingerprint)), RunFingerprint())
            accepted = check_fingerprints(path, ckpt, recorder.measure(self.datamodule, self.model), self._accept)
            if ours:
                try:
                    check_resume_data(ckpt, self.datamodule.train_dataloader(), self.trainer.world_size)
                except ValueError as err:
                    changed = [what for part, what in accepted if part == "train_data"]
                    if not changed:
                        raise
                    raise ValueError(f"{err}; the training data changed ({changed[0]})") from None
            if self.trainer.is_global_zero:
                for part, what in accepted:
                    print(f"melora-lit: --accept_change {part}: {what}", file=sys.stderr)
            done = finished_run(ckpt, self.trainer.max_epochs, self.trainer.max_steps)
        for callback in self.trainer.checkpoint_callbacks:
            option = "checkpoint.monitor" if isinstance(callback, ResumableCheckpoint) else \
                f"{type(callback).__name__}.monitor"
            _check_monitor(getattr(callback, "monitor", None), self.model, self.datamodule, option)
        for callback in self.trainer.early_stopping_callbacks:  # refused now, not after the first epoch
            _check_monitor(callback.monitor, self.model, self.datamodule, "EarlyStopping.monitor")
        if done is not None:  # valid, but nothing to train: say so, write nothing (a requeued job that finished ends 0)
            if self.trainer.is_global_zero:
                print(f"melora-lit: {path} is a finished run: {done}; nothing to resume, nothing written. Raise "
                      f"--trainer.max_epochs (or max_steps) to train on, or start a new run without --ckpt_path",
                      file=sys.stderr)
            sys.exit(0)

    def after_fit(self) -> None:
        # fit prints no metrics table (validate does): say where the run ended
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                       if k.startswith("val") and getattr(v, "numel", lambda: 1)() == 1}
            if metrics:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
                print(f"melora-lit: after {self.trainer.global_step} steps: {shown}", file=sys.stderr)


#: What ``fit --accept_change`` may accept of a resumed checkpoint (melora_lit.fingerprint).
ACCEPTABLE = ("train_data", "val_data", "backbone")

#: ``--ckpt_path`` values that are not a path.
CKPT_KEYWORDS = (LAST, LAST_OR_NEW, "best", "hpc", "registry")

_DEVICES_HELP = "use a number of devices (1, 2, ...; -1 for all), device indices (0,1 or [0, 1]: GPUs) or auto"


def check_trainer_settings(trainer: Any) -> None:
    """Refuse (one-line ``ValueError``), before the run folder is made, trainer settings that
    Lightning takes with a traceback, or not at all: an unknown accelerator name, a ``devices``
    value that is no count, index list or ``auto``, device indices on the CPU, an
    ``accumulate_grad_batches`` below 1 (0 divides by zero, a negative one trains as 1)."""
    if trainer is None:
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str):
        names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
        if accelerator not in names:
            raise ValueError(f"trainer.accelerator={accelerator!r} is not valid; use one of {', '.join(names)}")
    devices = trainer.get("devices")
    indices = _device_indices(devices)
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                   and not torch.backends.mps.is_available())
    if indices is not None and cpu:
        raise ValueError(f"trainer.devices={devices!r} names device indices ({', '.join(map(str, indices))}), which "
                         f"the CPU does not have; on the CPU give a number of processes (e.g. 1 or 2)")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1):
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate!r} is not valid; use an integer >= 1 (the "
                         f"batches whose gradients add up to one optimizer step)")


def _device_indices(devices: Any) -> list[int] | None:
    """The device indices a ``devices`` value names (``0,1``, ``3,``, ``[0, 1]``), None for a count
    or ``auto``; a one-line ``ValueError`` for anything else (Lightning's ``int()`` traceback)."""
    if isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1):
        return None
    if isinstance(devices, list) and devices and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                     for d in devices):
        return devices
    text = devices.strip() if isinstance(devices, str) else None
    if text is not None and (text == "auto" or re.fullmatch(r"-1|[1-9]\d*", text)):
        return None
    if text is not None and "," in text and re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
        return [int(part) for part in text.split(",") if part.strip()]
    raise ValueError(f"trainer.devices={devices!r} is not valid; {_DEVICES_HELP}")


def check_vocabulary(tokenizer_name: str | None, tokenizer: Any, source: Any) -> None:
    """Refuse (one-line ``ValueError``) a tokenizer with more tokens than the backbone (``source``,
    a :class:`~melora_lit.training.tasks.BackboneSource`) has token embeddings: its larger ids
    would fail the first forward deep in the embedding lookup."""
    rows = vocabulary_size(source.model_name_or_path, source.gguf_file)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens, more than the {rows} token "
                         f"embeddings (vocab_size) of model {source.model_name_or_path!r}: its ids >= {rows} have no "
                         f"embedding; use the model's own tokenizer (data.init_args.tokenizer) or a model of its "
                         f"vocabulary")


def _check_monitor(monitor: str | None, model: Any, datamodule: Any, option: str = "checkpoint.monitor") -> None:
    """A validation monitor this run never logs is an error now, not after training (when no
    checkpoint could be written). Only ``VAL_NAME/...`` monitors are checked."""
    from .data.base import MELoRADataModule

    if not monitor:
        return
    names = list(getattr(datamodule, "val_names", None) or ["val"])
    if not any(monitor.startswith(f"{n}/") for n in names):
        return
    data = datamodule if isinstance(datamodule, MELoRADataModule) else None
    if data is None and model.task.metrics_from_data:
        return  # a data module outside the contract names its own metrics
    metrics = model.task.build_metrics(data)  # what the module logs (melora_lit.training.tasks)
    task = model.task.name
    logged = sorted({f"{n}/{k}" for n in names for k in [*metrics.keys(), "loss"]})
    if monitor not in logged:
        raise ValueError(f"{option}={monitor!r} is never logged by this run (task {task}); use one of "
                         f"{', '.join(logged)}")


def typed_model_keys(args: list[str], subcommand: str | None) -> set[str]:
    """The model settings the user typed: ``--model.KEY`` arguments and the ``model`` keys of their
    own ``--config`` files (dotted, e.g. ``melora.n``; "" for all, after ``--model VALUE``). The
    packaged quickstart config that :func:`_with_default_config` adds is a default, not typed."""
    import yaml

    keys: set[str] = set()
    for i, arg in enumerate(args):
        if arg.startswith("--model."):
            keys.add(arg[len("--model."):].split("=", 1)[0])
        elif arg == "--model" or arg.startswith("--model="):
            keys.add("")
        elif arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
            if path is None or path == quickstart_config():
                continue
            try:
                data = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # the parser has refused or will refuse it
            if isinstance(data, dict) and isinstance(data.get(subcommand), dict):
                data = data[subcommand]
            model = data.get("model") if isinstance(data, dict) else None
            keys |= set(_dotted(model)) if isinstance(model, dict) else ({""} if model is not None else set())
    return keys


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
    return out


def _is_typed(key: str, typed: set[str]) -> bool:
    """Whether the setting ``key`` (dotted) is, or lies inside or around, one the user typed."""
    return "" in typed or any(key == t or key.startswith(t + ".") or t.startswith(key + ".") for t in typed)


def _with_default_config(args: list[str]) -> list[str]:
    """Put the quickstart config under a subcommand that was given no ``--config`` (its
    checkpoint monitor follows the task: :meth:`MELoRACLI._with_task_monitor`)."""
    if args and args[0] in SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in args):
        if not any(a in ("-h", "--help") for a in args):
            return [args[0], "--config", quickstart_config(), *args[1:]]
    return args


_EXPORT_HELP = ("melora-lit export --ckpt_path CKPT --output_dir DIR [--format merged|adapter|peft|all]: "
                "a merged transformers model, the adapter or a PEFT LoRA adapter from a checkpoint "
                "(melora-lit export --help). melora-lit report RUN_DIR [RUN_DIR ...] --output DIR: a Markdown "
                "table and a plot comparing runs (melora-lit report --help). melora-lit generate --ckpt_path CKPT "
                "[--prompt TEXT]: replies of a causal LM, or a chat on stdin (melora-lit generate --help)")


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
    if args and args[0] == "generate":  # talk to a causal LM
        from .generate import generate_main

        return generate_main(args[1:])  # type: ignore[return-value]
    return _run_cli(_with_default_config(args), run)


def _run_cli(args: list[str], run: bool) -> MELoRACLI:
    return MELoRACLI(
        MELoRAModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": _EXPORT_HELP},
        # always on, not configurable: RNG states and the loader position, back on resume
        # and a learning rate found by LearningRateFinder is the one the run trains with
        # and validate/test/predict stop on SIGTERM/SIGUSR1 (exit 3) and SIGINT (exit 130)
        # and every checkpoint records the data and backbone it was trained on
        trainer_defaults={"callbacks": [ExactResume(), ApplyFoundLearningRate(), StopOnSignal(),
                                        RunFingerprint()]},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The ``melora-lit`` command: a failure ends as one ``melora-lit: error:`` line and its exit
    status (:func:`melora_lit.errors.error_exit`), no traceback unless ``MELORA_LIT_DEBUG`` is set."""
    # main passes the (possibly completed) command line as `args`; that is intended here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    args = list(sys.argv[1:] if args is None else args)

    def command() -> None:
        # from here a stop signal stops the command at its first safe point (melora_lit.run); the
        # commands without a trainer stop where they are, removing what they were writing
        preemption.install(raise_on_signal=bool(args) and args[0] in ("export", "evaluate", "report", "generate"))
        cpu_kernels.kernels_setting()  # a bad MELORA_LIT_CPU_KERNELS fails here, not at the first step
        check_config_files(args)
        cli_main(args)

    run_command(args, command, debug=bool(os.environ.get("MELORA_LIT_DEBUG")))


def _one_line_parser_error(message: str, ex: Exception | None = None) -> None:
    """jsonargparse's error, as one ``melora-lit: error:`` line (its own is usage plus a
    multi-line report), exit status 2 as before."""
    if os.environ.get("MELORA_LIT_DEBUG"):
        print(message, file=sys.stderr)
    print(f"melora-lit: error: {parser_message(message)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
