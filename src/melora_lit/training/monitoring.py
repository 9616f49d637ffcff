"""Training monitors of melora-lit; the CLI adds all three to every run.

TensorBoard tags (``M`` is a MELoRA module's path in the backbone, e.g.
``bert.encoder.layer.0.attention.self.query``):

=====================================  =========================================================
``train/grad_norm``                    total 2-norm of the gradients of all trainable parameters,
                                       before clipping, each optimizer step
                                       (:class:`MELoRADiagnostics`, ``--diagnostics.*``)
``melora/delta_norm/M``                ‖ΔW‖_F, ΔW = (alpha/r)·blockdiag(B_i A_i), every
                                       ``every_n_steps`` optimizer steps and at the start
``melora/rank/M``                      rank reached: Σ_i numerical rank of B_i A_i (≤ n·r;
                                       tolerance of ``torch.linalg.matrix_rank``, see
                                       :func:`melora_lit.adapter.diagnostics.block_ranks`)
``melora/block_cos_sim/M``             mean pairwise cosine similarity of the flattened blocks
                                       B_i A_i (1: the mini LoRAs learned the same update); not
                                       logged for n = 1 or while B = 0
``melora/{delta_norm,rank,             the same, averaged over the adapted modules
block_cos_sim}/mean``
``melora/rank_fraction/mean``          Σ rank / Σ n·r over the modules
``melora_hist/M/lora_A``, ``…/lora_B`` histograms of the factors (``--diagnostics.histograms true``)
``train/device/samples_per_sec``,      throughput over the last ``window_size`` optimizer steps
``train/device/items_per_sec``,        (:class:`TokenThroughputMonitor`, ``--throughput.*``):
``train/device/batches_per_sec``       items are non-padding tokens (attention mask); with
                                       several processes also ``train/samples_per_sec`` etc.
                                       for all of them; ``train/time``, ``train/samples``,
                                       ``train/lengths`` (tokens), ``train/batches`` are totals;
                                       ``validate/…`` the same during validation
``hp_metric``                          best value so far of the monitored validation metric
                                       (:class:`BestMetricHParams`, ``--hp_metric.*``), also the
                                       metric of TensorBoard's HParams view
=====================================  =========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..adapter.diagnostics import adapter_diagnostics
from ..adapter import melora_layers
from ..metrics import main_metric
from . import lightning_private

__all__ = ["MELoRADiagnostics", "TokenThroughputMonitor", "BestMetricHParams", "batch_size", "num_tokens",
           "follow_early_stopping"]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor from a (possibly FSDP2-sharded) DTensor; a collective for DTensors."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class MELoRADiagnostics(Callback):
    """Log the gradient norm each optimizer step and, every ``every_n_steps`` optimizer steps (and
    when training starts), for each MELoRA module ‖ΔW‖_F, the rank reached and the mini LoRAs'
    mean pairwise cosine similarity, plus their mean over the modules (tags: see
    :mod:`melora_lit.training.monitoring`). Computed from the factors, blockwise, never as a dense ΔW.

    Args:
        every_n_steps: optimizer steps between two diagnostics; 0 turns them off.
        histograms: also log histograms of every module's ``lora_A`` and ``lora_B`` (TensorBoard);
            off by default: with hundreds of adapted modules they make the event file large.
        grad_norm: log ``train/grad_norm``.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = False, grad_norm: bool = True) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} is not valid; use an integer >= 0 (0: off)")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.grad_norm = grad_norm
        self._last_step: int | None = None

    # --------------------------------------------------------------------------- gradient norm
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.grad_norm:
            return
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        with torch.no_grad():
            if hasattr(torch.nn.utils, "get_total_norm"):
                total = torch.nn.utils.get_total_norm(grads, 2.0)
            else:  # torch < 2.6
                total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
            total = _full(total).detach().float()
        pl_module.log("train/grad_norm", total, on_step=True, on_epoch=False)

    # --------------------------------------------------------------------------- adapter diagnostics
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_log(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._maybe_log(trainer, pl_module)

    def _maybe_log(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        step = trainer.global_step
        if self.every_n_steps == 0 or step == self._last_step:
            return
        if not force and step % self.every_n_steps:
            return
        self._last_step = step
        self.log_diagnostics(trainer, pl_module, step)

    @torch.no_grad()
    def log_diagnostics(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Compute and log the diagnostics now; returns the scalars (on every process)."""
        layers = melora_layers(getattr(pl_module, "model", None) or pl_module)
        metrics: dict[str, float] = {}
        per: dict[str, list[float]] = {"delta_norm": [], "rank": [], "block_cos_sim": []}
        rank_sum = max_rank_sum = 0
        hists: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            # every process takes part when the factors are FSDP2 shards (a collective)
            a, b = _full(layer.lora_A.detach()), _full(layer.lora_B.detach())
            n, r = layer.n, layer.r
            if tuple(a.shape) != (n, r, layer.d_in // n) or tuple(b.shape) != (n, layer.d_out // n, r):
                continue  # e.g. a flattened FSDP1 shard: not the layer's factors
            d = adapter_diagnostics(a, b, layer.scaling)
            metrics[f"melora/delta_norm/{name}"] = d.delta_norm
            metrics[f"melora/rank/{name}"] = float(d.rank)
            per["delta_norm"].append(d.delta_norm)
            per["rank"].append(float(d.rank))
            rank_sum += d.rank
            max_rank_sum += d.max_rank
            if d.block_cos_sim is not None:
                metrics[f"melora/block_cos_sim/{name}"] = d.block_cos_sim
                per["block_cos_sim"].append(d.block_cos_sim)
            if self.histograms:
                hists[f"melora_hist/{name}/lora_A"] = a
                hists[f"melora_hist/{name}/lora_B"] = b
        for key, values in per.items():
            if values:
                metrics[f"melora/{key}/mean"] = sum(values) / len(values)
        if max_rank_sum:
            metrics["melora/rank_fraction/mean"] = rank_sum / max_rank_sum
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                if hists and isinstance(logger, TensorBoardLogger):
                    for tag, values in hists.items():
                        logger.experiment.add_histogram(tag, values.float().cpu(), global_step=step)
        return metrics


# ------------------------------------------------------------------------------- throughput
def batch_size(batch: Any) -> int:
    """Number of samples of a batch (a dict or a transformers ``BatchEncoding``): rows of
    ``input_ids`` (or of its first tensor)."""
    if isinstance(batch, Mapping):
        t = batch.get("input_ids")
        if t is None:
            t = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        return max(int(len(t)), 1) if t is not None else 1
    return max(len(batch), 1) if hasattr(batch, "__len__") else 1


def num_tokens(batch: Any) -> int:
    """Number of non-padding tokens of a batch (its attention mask), at least one per sample."""
    samples = batch_size(batch)
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if mask is not None:
            return max(int(mask.sum()), samples)
        ids = batch.get("input_ids")
        if ids is not None:
            return max(int(ids.numel()), samples)
    return samples


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's :class:`~lightning.pytorch.callbacks.ThroughputMonitor` counting samples
    (``input_ids`` rows) and items = non-padding tokens (``attention_mask``): logs
    ``train/device/samples_per_sec`` and ``train/device/items_per_sec`` (tokens/s), averaged over the
    last ``window_size`` optimizer steps, and the same for validation (``validate/…``).

    Args:
        window_size: number of batches of the rolling average; nothing per second is logged
            before that many batches.
    """

    def __init__(self, window_size: int = 20) -> None:
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"window_size={window_size!r} is not valid; use an integer >= 2")
        super().__init__(batch_size_fn=batch_size, length_fn=num_tokens, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        lightning_private.throughput_flops_if_given(self, pl_module)


# ------------------------------------------------------------------------------- hparams view
def _improves(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class BestMetricHParams(Callback):
    """Make runs comparable in TensorBoard's HParams view.

    When ``fit`` starts, write the hparams summary with every hyper-parameter (the module's
    arguments, ``trainable_params``, ``total_params``, ``adapter_params``, the MELoRA config as
    injected, ``hp_metric_monitor`` and ``hp_metric_mode``) and the metric ``hp_metric``; after each
    validation, log ``hp_metric`` = the best value so far of the monitored validation metric (the
    HParams view shows a tag's last value). TensorBoard keeps the first hparams summary of an
    event file, so this one must be complete: callbacks' ``on_fit_start`` runs before the
    module's and before Lightning logs the module's arguments. The best value is saved with
    checkpoints, so a resumed run keeps it.

    Args:
        monitor: validation metric, e.g. ``val/accuracy``; default: the checkpoint's ``monitor``
            (``--checkpoint.monitor``), else the task's main metric
            (:func:`melora_lit.metrics.main_metric`).
        mode: ``max`` or ``min``; default: the checkpoint's mode for its monitor, else ``min`` for
            a loss or perplexity and ``max`` for anything else.
    """

    def __init__(self, monitor: str | None = None, mode: Literal["min", "max"] | None = None) -> None:
        super().__init__()
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode={mode!r} is not valid; use 'min' or 'max'")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None
        self._resolved: tuple[str, str] | None = None

    def _resolve(self, trainer: L.Trainer, names: Any = ()) -> tuple[str, str] | None:
        if self._resolved is not None:
            return self._resolved
        ckpt = trainer.checkpoint_callback
        ckpt_monitor = getattr(ckpt, "monitor", None)
        monitor, mode = self.monitor, self.mode
        if monitor is None and ckpt_monitor:
            monitor = ckpt_monitor
        if monitor is None:
            found = main_metric(names)
            if found is None:
                return None
            monitor, auto_mode = found
            mode = mode or auto_mode
        if mode is None:
            if monitor == ckpt_monitor and getattr(ckpt, "mode", None) in ("min", "max"):
                mode = ckpt.mode
            else:
                mode = "min" if monitor.rsplit("/", 1)[-1] in ("loss", "perplexity") else "max"
        self._resolved = (monitor, mode)
        return self._resolved

    @staticmethod
    def _metric_names(pl_module: L.LightningModule) -> list[str]:
        """The validation metrics the module will log (``val/loss`` plus its metric collections)."""
        names = ["val/loss"]
        for collection in getattr(pl_module, "val_metrics", None) or []:
            try:
                names += list(collection.keys())
            except (AttributeError, TypeError):
                pass
        return names

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            follow_early_stopping(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolved = self._resolve(trainer, self._metric_names(pl_module))
        params: dict[str, Any] = {k: v for k, v in pl_module.hparams_initial.items() if not k.startswith("_")}
        dm = trainer.datamodule
        if dm is not None and lightning_private.logs_hyperparameters(dm):
            params.update({k: v for k, v in dm.hparams_initial.items() if not k.startswith("_")})
        if hasattr(pl_module, "run_hparams"):  # MELoRAModule: parameter counts, MELoRA config
            params.update(pl_module.run_hparams())
        if resolved is not None:
            params["hp_metric_monitor"], params["hp_metric_mode"] = resolved
        # before any validation: Lightning's placeholder -1, or the best of a resumed run
        value = self.best if self.best is not None else -1
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics={"hp_metric": value}, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning logs hp_metric = -1 after on_fit_start; a resumed run's best comes back here
        if self.best is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"hp_metric": self.best}, step=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        resolved = self._resolve(trainer, trainer.callback_metrics)
        if resolved is None:
            return
        monitor, mode = resolved
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            return
        value = float(value)
        if _improves(value, self.best, mode):
            self.best, self.best_step = value, trainer.global_step
        if self.best is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"hp_metric": self.best}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step,
                "monitor": self._resolved[0] if self._resolved else None,
                "mode": self._resolved[1] if self._resolved else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        monitor, mode = state_dict.get("monitor"), state_dict.get("mode")
        # a resumed run that monitors another metric starts its own best
        if monitor and self.monitor in (None, monitor) and self.mode in (None, mode):
            self._resolved = (monitor, mode)
            self.best = state_dict.get("best")
            self.best_step = state_dict.get("best_step")


def follow_early_stopping(trainer: L.Trainer) -> None:
    """With an :class:`~lightning.pytorch.callbacks.EarlyStopping` callback and a checkpoint that
    monitors nothing (it would keep only the last epoch, ``patience`` validations past the best),
    make the checkpoint monitor the early-stopping metric and mode: the best checkpoint, the
    metric early stopping waited on and ``hp_metric`` (which follows the checkpoint) are then
    one value. Where the two monitor different metrics, say so."""
    stops = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    ckpt = trainer.checkpoint_callback
    if not stops or not isinstance(ckpt, ModelCheckpoint):
        return
    stop = stops[0]
    if ckpt.monitor is None:
        ckpt.monitor, ckpt.mode = stop.monitor, stop.mode
        # what ModelCheckpoint.__init__ sets for a mode: the worst value, for the top-k comparison
        ckpt.kth_value = torch.tensor(math.inf if stop.mode == "min" else -math.inf)
        rank_zero_info(f"melora-lit: the best checkpoint and hp_metric follow EarlyStopping's "
                       f"{stop.monitor} ({stop.mode})")
    elif ckpt.monitor != stop.monitor:
        rank_zero_warn(f"EarlyStopping monitors {stop.monitor} but the best checkpoint and hp_metric follow "
                       f"{ckpt.monitor} (--checkpoint.monitor); set both to the same metric to keep the "
                       f"checkpoint early stopping chose")
