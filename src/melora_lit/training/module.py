"""The Lightning side: a LightningModule that puts MELoRA into a frozen transformers backbone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn

from .. import __version__
from ..adapter import MELoRAConfig, adapter_state_dict, inject_melora, load_adapter_state_dict, melora_layers
from .metrics import classification_metrics, language_modeling_metrics
from ..sources import resolve_pretrained

# Heads that a sequence classifier builds fresh: always trained and saved with the adapter.
_CLASSIFIER_HEADS = ("classifier", "score")
TASKS = ("sequence-classification", "causal-lm")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationOptions:
    """How ``predict`` generates responses with a causal LM (``task: causal-lm``).

    Not stored in checkpoints: the values of the predict run's config apply.

    Args:
        max_new_tokens: most tokens generated per response.
        do_sample: sample (with temperature, top_p, top_k) instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling: keep the smallest set of tokens with this total probability.
        top_k: keep only the k most likely tokens when sampling (0: all).
        repetition_penalty: penalty on tokens already generated (1.0: none).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is not valid; use an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} is not valid; use a value > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is not valid; use a value in (0, 1]")


def load_backbone(
    model_name_or_path: str,
    task: str = "sequence-classification",
    num_labels: int = 2,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers model by hub name, local path, ``package:MODULE`` or GGUF file (see
    :mod:`melora_lit.sources`), with a clear error when it can't.

    ``task``: ``sequence-classification`` (a fresh head of ``num_labels`` outputs, 1 = regression)
    or ``causal-lm`` (the model with its language modeling head; num_labels and label_names are
    not used).
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"task={task!r} is not valid; use one of {', '.join(TASKS)}")
    model_name_or_path = resolve_pretrained(model_name_or_path, gguf_file)
    if task == "causal-lm":
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
            )
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            hint = " (HF_HUB_OFFLINE is set: pass a local model directory instead)" if offline else ""
            raise ValueError(f"cannot load model {model_name_or_path!r}{hint}: {str(err).splitlines()[0]}") from None
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
        model_name_or_path: hub name (e.g. ``roberta-base``), local directory, ``package:MODULE``
            (a model shipped in a Python package) or GGUF file of the backbone (see
            :mod:`melora_lit.sources`).
        task: what the backbone is trained for: ``sequence-classification`` (a classification
            head; one output = regression) or ``causal-lm`` (instruction tuning of a decoder:
            token loss, perplexity, ``predict`` generates responses).
        num_labels: number of classes (1 = regression). Linked from the data module by the CLI;
            not used by ``causal-lm``.
        label_names: class names in id order, saved with each checkpoint and used by
            ``predict``. Linked from the data module by the CLI; not used by ``causal-lm``.
        melora: the adapter: rank, number of mini LoRAs, targets, modules to save.
        learning_rate: peak AdamW learning rate of the adapter.
        head_learning_rate: learning rate of ``modules_to_save`` (the head); default the same.
        weight_decay: AdamW weight decay; never applied to biases and normalization weights.
        warmup_ratio: fraction of the training steps with a linear warmup, followed by a
            linear decay to zero.
        warmup_steps: number of warmup steps; overrides ``warmup_ratio`` when set.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        trust_remote_code: allow the backbone's own code from the hub (off unless set).
        gguf_file: a GGUF file in the ``model_name_or_path`` directory or hub repository (or an
            absolute path): the backbone is dequantized from it once and cached.
        backbone_dtype: dtype of the frozen backbone weights (default: as the checkpoint loads,
            float32 for most); ``bfloat16`` halves the memory of a 7B model. The adapters and
            ``modules_to_save`` stay float32 either way.
        generation: ``predict`` decoding for ``causal-lm`` (greedy by default); not stored in
            checkpoints, so each predict run's config decides.
        gradient_checkpointing: recompute the backbone layers' activations in backward
            (non-reentrant) instead of keeping them: less activation memory, more compute.
    """

    def __init__(
        self,
        model_name_or_path: str,
        task: Literal["sequence-classification", "causal-lm"] = "sequence-classification",
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
        warmup_steps: int | None = None,
        gguf_file: str | None = None,
        backbone_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        generation: GenerationOptions | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        melora = melora if melora is not None else MELoRAConfig()
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not valid; use one of {', '.join(TASKS)}")
        if task == "sequence-classification":
            if num_labels < 1:
                hint = " (instruction data needs --model.task causal-lm)" if num_labels == 0 else ""
                raise ValueError(f"num_labels={num_labels} is not valid; use 1 (regression) or the number of "
                                 f"classes{hint}")
            if label_names is not None and len(label_names) != num_labels:
                raise ValueError(f"label_names has {len(label_names)} names but num_labels={num_labels}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} is not valid; use a fraction in [0, 1)")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} is not valid; use an integer >= 0")
        if backbone_dtype is not None and backbone_dtype not in _DTYPES:
            raise ValueError(f"backbone_dtype={backbone_dtype!r} is not valid; use one of {', '.join(_DTYPES)}")
        # plain types only in hparams, so checkpoints load with weights_only=True; generation
        # stays out so that a predict run's own settings apply (LightningCLI restores hparams)
        self.save_hyperparameters(ignore=["melora", "generation"])
        self.hparams["melora"] = melora.to_dict()
        self.melora_config = melora
        self.generation = generation if generation is not None else GenerationOptions()
        self.label_names = list(label_names) if label_names and task == "sequence-classification" else None
        self.model: nn.Module | None = None
        # Checkpoints hold only the trainable state; the frozen backbone comes from its source.
        self.strict_loading = False

    # ----------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # called again by validate/test after fit
            return
        hp = self.hparams
        extra = {"dtype": _DTYPES[hp.backbone_dtype]} if hp.get("backbone_dtype") else {}
        model = load_backbone(hp.model_name_or_path, hp.task, hp.num_labels, self.label_names,
                              trust_remote_code=hp.trust_remote_code, gguf_file=hp.get("gguf_file"), **extra)
        # from_pretrained returns eval mode, and Lightning keeps submodule modes as it finds
        # them: without this the backbone's dropout would stay off during training.
        model.train(self.training)
        config = self.melora_config
        if not config.modules_to_save and hp.task == "sequence-classification":
            heads = [h for h in _CLASSIFIER_HEADS if hasattr(model, h)]
            config = MELoRAConfig(**{**config.to_dict(), "modules_to_save": heads})
        self.summary = inject_melora(model, config)
        if hp.get("backbone_dtype") not in (None, "float32"):
            _trainable_to_float32(model)
        self.melora_config = config
        self._scale_out(model)
        self.model = model

    def on_fit_start(self) -> None:
        # Not in self.hparams: those must stay the init arguments, which LightningCLI reads
        # back from a checkpoint to rebuild the model.
        for logger in self.loggers:
            logger.log_hyperparams(self.run_hparams())

    def run_hparams(self) -> dict[str, Any]:
        """What a run logs besides the init arguments: parameter counts and the MELoRA config
        as injected (head included)."""
        return {
            "trainable_params": self.summary.trainable_params,
            "total_params": self.summary.total_params,
            "adapter_params": self.summary.adapter_params,
            "melora": self.melora_config.to_dict(),
        }

    def forward(self, **batch: torch.Tensor) -> Any:
        if self.is_causal_lm:  # no KV cache in training: it costs memory and hides packed rows' boundaries
            batch.setdefault("use_cache", False)
        return self.model(**batch)

    @property
    def is_regression(self) -> bool:
        return self.hparams.task == "sequence-classification" and self.hparams.num_labels == 1

    @property
    def is_causal_lm(self) -> bool:
        return self.hparams.task == "causal-lm"

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)

    # ----------------------------------------------------------------------------- metrics
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "val_names", ["val"]))
        if self.is_causal_lm:
            if dm is not None and getattr(dm, "num_labels", 0):
                raise ValueError(f"task='causal-lm' trains on instruction data (InstructionDataModule, "
                                 f"ChitChatDataModule); {type(dm).__name__} gives class labels")
            base = language_modeling_metrics()
        elif dm is not None and hasattr(dm, "build_metrics"):
            base = dm.build_metrics()
        else:
            base = self._default_metrics()
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
        # sync_dist: the logged loss is the mean over all processes' batches (a no-op on one)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]),
                 sync_dist=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> None:
        out = self(**batch)
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[dataloader_idx]
        if self.is_causal_lm:
            # loss and perplexity over the epoch's target tokens: the model's loss is the mean over
            # this batch's targets (labels shifted by one, -100 ignored), so weigh it by their count
            num_tokens = (batch["labels"][:, 1:] != -100).sum()
            metrics.update(out.loss.detach().float() * num_tokens, num_tokens)
            self.log_dict(metrics, prog_bar=True, on_epoch=True, add_dataloader_idx=False,
                          batch_size=len(batch["input_ids"]))
            return
        metrics.update(self._predictions(out.logits), batch["labels"])
        prefix = self._val_names[dataloader_idx].replace("val", stage, 1)
        kw = dict(on_epoch=True, add_dataloader_idx=False, batch_size=len(batch["input_ids"]))
        self.log(f"{prefix}/loss", out.loss, sync_dist=True, **kw)  # over all processes' batches
        self.log_dict(metrics, prog_bar=True, **kw)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        if self.is_causal_lm:
            return {"response": self.generate(batch["input_ids"], batch.get("attention_mask"))}
        logits = self(**batch).logits.float()
        if self.is_regression:
            return {"prediction": logits.squeeze(-1).tolist()}
        probs = logits.softmax(-1)
        score, ids = probs.max(-1)
        names = self.label_names or [str(i) for i in range(self.hparams.num_labels)]
        return {"prediction": [names[i] for i in ids.tolist()], "score": score.tolist()}

    def _tokenizer(self):
        """The data module's tokenizer (pad token set), else the backbone's."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is None:
            if getattr(self, "_own_tokenizer", None) is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(
                    resolve_pretrained(self.hparams.model_name_or_path, self.hparams.get("gguf_file")))
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                self._own_tokenizer = tok
            tokenizer = self._own_tokenizer
        return tokenizer

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Responses to a batch of left-padded prompts, decoded without special tokens and
        stripped, with :attr:`generation` settings; stops at the tokenizer's EOS token."""
        from transformers import GenerationConfig

        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs left-padded prompts (the last position of a row is padding)")
        tok = self._tokenizer()
        g = self.generation
        options: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample,
                                   "repetition_penalty": g.repetition_penalty,
                                   "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
        if g.do_sample:
            options.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        else:  # a model's own sampling defaults would only draw warnings in greedy mode
            options.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  generation_config=GenerationConfig(**options))
        return [text.strip() for text in tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]

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
        warmup = hp.warmup_steps if hp.get("warmup_steps") is not None else int(hp.warmup_ratio * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, min(warmup, total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- checkpoints
    def _scale_out(self, model: nn.Module) -> None:
        """Gradient checkpointing, and FSDP2 sharding under a ModelParallelStrategy (see
        :mod:`melora_lit.training.strategies`). Records the checkpoint's keys and shapes first: sharding
        splits the tensors (FSDP2) or renames the modules (FSDP1)."""
        self._checkpoint_shapes = {"model." + k: tuple(v.shape) for k, v in adapter_state_dict(model).items()}
        if self.hparams.get("gradient_checkpointing"):
            from .strategies import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        if self.device_mesh is not None:
            from .strategies import apply_fsdp2

            apply_fsdp2(model, self.device_mesh)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep only the adapter and the saved modules: a MiniLM checkpoint is ~1 MB, not ~90 MB.
        # (The strategies of melora_lit.training.strategies gather them to full tensors on rank 0.)
        keep = self._checkpoint_shapes
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["melora"] = {
            "config": self.melora_config.to_dict(),
            "base_model_name_or_path": self.hparams.model_name_or_path,
            "label_names": self.label_names,
            "melora_lit_version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from .strategies import check_state_shapes, is_sharded, load_full_state

        # Lightning's own FSDP and ModelParallel strategies load (and pop) the state dict
        # themselves; those of melora_lit.training.strategies leave it here.
        if "state_dict" in checkpoint and self._trainer is not None and is_sharded(self.trainer.strategy.model):
            state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
            check_state_shapes(state, self._checkpoint_shapes)  # one line naming the mismatch
            load_full_state(self.trainer.strategy.model, state)  # each rank keeps its shard
        elif "state_dict" in checkpoint:
            state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
            try:
                # validates keys and shapes with a message that names the mismatch
                load_adapter_state_dict(self.model, state)
            except ValueError as err:
                raise ValueError(f"checkpoint does not fit this model: {err}") from None
        meta = checkpoint.get("melora", {})
        if meta.get("label_names") and not self.label_names:
            self.label_names = list(meta["label_names"])


def _trainable_to_float32(model: nn.Module) -> None:
    """Keep the trained parameters in float32 under a low-precision backbone (the layer casts
    them to its compute dtype on the fly; merging adds the update in float32)."""
    with torch.no_grad():
        for layer in melora_layers(model).values():
            layer.lora_A.data = layer.lora_A.data.float()
            layer.lora_B.data = layer.lora_B.data.float()
        for name in getattr(model, "_melora_modules_to_save", []):
            saved = model.get_submodule(name).float()
            # the backbone hands it low-precision activations: compute in float32, hand back
            # the backbone's dtype (a classifier head's logits included)
            saved.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
            saved.register_forward_hook(_output_to_input_dtype, with_kwargs=True)


def _low_precision_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
            return value.dtype
    return None


def _inputs_to_float32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    module._melora_input_dtype = _low_precision_dtype(args, kwargs)
    if module._melora_input_dtype is None:
        return args, kwargs

    def cast(v: Any) -> Any:
        return v.float() if torch.is_tensor(v) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _output_to_input_dtype(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    dtype = getattr(module, "_melora_input_dtype", None)
    if dtype is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(dtype)
    return output
