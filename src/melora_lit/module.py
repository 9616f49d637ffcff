"""The Lightning side: a LightningModule that puts MELoRA into a frozen transformers backbone."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn

from . import __version__
from .melora import MELoRAConfig, adapter_state_dict, inject_melora, load_adapter_state_dict
from .metrics import classification_metrics
from .paths import resolve_pretrained

# Heads that a sequence classifier builds fresh: always trained and saved with the adapter.
_CLASSIFIER_HEADS = ("classifier", "score")


def load_backbone(
    model_name_or_path: str,
    task: str = "sequence-classification",
    num_labels: int = 2,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers model by hub name or local path, with a clear error when it can't."""
    import transformers

    model_name_or_path = resolve_pretrained(model_name_or_path)
    if task != "sequence-classification":
        raise ValueError(f"task={task!r} is not valid; use 'sequence-classification'")
    config_kwargs: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        config_kwargs["problem_type"] = "regression"
    elif label_names:
        config_kwargs["id2label"] = dict(enumerate(label_names))
        config_kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    try:
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, **config_kwargs, **kwargs
        )
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set: pass a local model directory instead)" if offline else ""
        raise ValueError(f"cannot load model {model_name_or_path!r}{hint}: {str(err).splitlines()[0]}") from None


class MELoRAModule(L.LightningModule):
    """Fine-tune a frozen transformers backbone through MELoRA adapters.

    Args:
        model_name_or_path: hub name (e.g. ``roberta-base``) or local directory of the backbone.
        task: what the backbone is trained for; ``sequence-classification`` (one output =
            regression).
        num_labels: number of classes (1 = regression). Linked from the data module by the CLI.
        label_names: class names in id order, saved with each checkpoint and used by
            ``predict``. Linked from the data module by the CLI.
        melora: the adapter: rank, number of mini LoRAs, targets, modules to save.
        learning_rate: peak AdamW learning rate of the adapter.
        head_learning_rate: learning rate of ``modules_to_save`` (the head); default the same.
        weight_decay: AdamW weight decay; never applied to biases and normalization weights.
        warmup_ratio: fraction of the training steps with a linear warmup, followed by a
            linear decay to zero.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        trust_remote_code: allow the backbone's own code from the hub (off unless set).
    """

    def __init__(
        self,
        model_name_or_path: str,
        task: Literal["sequence-classification"] = "sequence-classification",
        num_labels: int = 2,
        label_names: list[str] | None = None,
        melora: MELoRAConfig | None = None,
        learning_rate: float = 5e-4,
        head_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        melora = melora if melora is not None else MELoRAConfig()
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels} is not valid; use 1 (regression) or the number of classes")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names but num_labels={num_labels}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} is not valid; use a fraction in [0, 1)")
        # plain types only in hparams, so checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["melora"])
        self.hparams["melora"] = melora.to_dict()
        self.melora_config = melora
        self.label_names = list(label_names) if label_names else None
        self.model: nn.Module | None = None
        # Checkpoints hold only the trainable state; the frozen backbone comes from its source.
        self.strict_loading = False

    # ----------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # called again by validate/test after fit
            return
        hp = self.hparams
        model = load_backbone(hp.model_name_or_path, hp.task, hp.num_labels, self.label_names,
                              trust_remote_code=hp.trust_remote_code)
        # from_pretrained returns eval mode, and Lightning keeps submodule modes as it finds
        # them: without this the backbone's dropout would stay off during training.
        model.train(self.training)
        config = self.melora_config
        if not config.modules_to_save:
            heads = [h for h in _CLASSIFIER_HEADS if hasattr(model, h)]
            config = MELoRAConfig(**{**config.to_dict(), "modules_to_save": heads})
        self.summary = inject_melora(model, config)
        self.melora_config = config
        self.model = model

    def on_fit_start(self) -> None:
        # Not in self.hparams: those must stay the init arguments, which LightningCLI reads
        # back from a checkpoint to rebuild the model.
        for logger in self.loggers:
            logger.log_hyperparams({
                "trainable_params": self.summary.trainable_params,
                "total_params": self.summary.total_params,
                "adapter_params": self.summary.adapter_params,
                "melora": self.melora_config.to_dict(),  # as injected, head included
            })

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    @property
    def is_regression(self) -> bool:
        return self.hparams.num_labels == 1

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)

    # ----------------------------------------------------------------------------- metrics
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "val_names", ["val"]))
        base = dm.build_metrics() if dm is not None and hasattr(dm, "build_metrics") else self._default_metrics()
        self.val_metrics = nn.ModuleList([base.clone(prefix=f"{n}/") for n in names])
        self.test_metrics = nn.ModuleList([base.clone(prefix=f"{n.replace('val', 'test', 1)}/") for n in names])
        self._val_names = names

    def _default_metrics(self) -> torchmetrics.MetricCollection:
        if self.is_regression:
            return torchmetrics.MetricCollection({"pearson": torchmetrics.PearsonCorrCoef(),
                                                  "spearman": torchmetrics.SpearmanCorrCoef()})
        return classification_metrics(self.hparams.num_labels)

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> None:
        out = self(**batch)
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[dataloader_idx]
        metrics.update(self._predictions(out.logits), batch["labels"])
        prefix = self._val_names[dataloader_idx].replace("val", stage, 1)
        kw = dict(on_epoch=True, add_dataloader_idx=False, batch_size=len(batch["input_ids"]))
        self.log(f"{prefix}/loss", out.loss, **kw)
        self.log_dict(metrics, prog_bar=True, **kw)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        logits = self(**batch).logits.float()
        if self.is_regression:
            return {"prediction": logits.squeeze(-1).tolist()}
        probs = logits.softmax(-1)
        score, ids = probs.max(-1)
        names = self.label_names or [str(i) for i in range(self.hparams.num_labels)]
        return {"prediction": [names[i] for i in ids.tolist()], "score": score.tolist()}

    # ----------------------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        saved = tuple(self.summary.modules_to_save)
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_head = any(name == s or name.startswith(s + ".") for s in saved)
            lr = hp.head_learning_rate if is_head and hp.head_learning_rate is not None else hp.learning_rate
            # biases and norm weights are 1-D; decaying them hurts and the paper's code does not
            wd = 0.0 if p.ndim < 2 else hp.weight_decay
            groups.setdefault((lr, wd), []).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
            lr=hp.learning_rate, betas=tuple(hp.adam_betas), eps=hp.adam_eps,
        )
        from transformers import get_linear_schedule_with_warmup

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep only the adapter and the saved modules: a MiniLM checkpoint is ~1 MB, not ~90 MB.
        keep = {"model." + k for k in adapter_state_dict(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["melora"] = {
            "config": self.melora_config.to_dict(),
            "base_model_name_or_path": self.hparams.model_name_or_path,
            "label_names": self.label_names,
            "melora_lit_version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
        try:
            # validates keys and shapes with a message that names the mismatch
            load_adapter_state_dict(self.model, state)
        except ValueError as err:
            raise ValueError(f"checkpoint does not fit this model: {err}") from None
        meta = checkpoint.get("melora", {})
        if meta.get("label_names") and not self.label_names:
            self.label_names = list(meta["label_names"])
