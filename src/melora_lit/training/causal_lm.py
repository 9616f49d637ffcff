"""Causal language modeling (``task: causal-lm``, instruction tuning of a decoder): the token loss
on the response, token-weighted over each optimizer step (:class:`TokenWeightedStep`) and in the
metrics (loss and perplexity), ``predict`` generates responses."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from ..metrics import language_modeling_metrics
from .tasks import BackboneSource, StepLoss, Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data.base import MELoRADataModule

__all__ = ["CausalLM", "GenerationOptions", "TokenWeightedStep"]


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
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is not valid; use an integer >= 0 (0: all tokens)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} is not valid; use a value > 0 "
                             "(1.0: none)")


#: attention backends that read sample boundaries from position ids alone: packed batches go to
#: them as one row without padding (:func:`~melora_lit.data.packing.flatten_packed`)
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def unpadded(module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch (position ids, no attention mask) as one unpadded row where the backbone's
    attention takes it (:data:`VARLEN_ATTENTION`); any other batch as it is."""
    if module.hparams.get("attn_implementation") not in VARLEN_ATTENTION:
        return batch
    if "position_ids" not in batch or "attention_mask" in batch:
        return batch
    from ..data.packing import flatten_packed

    return flatten_packed(batch)


class TokenWeightedStep:
    """The loss of an optimizer step, token-weighted over all its micro-batches and processes::

        step loss = (sum of the cross entropy of every target token of the step) / N
                     over W processes x A accumulated micro-batches;  N = their target tokens

    N is known only after the step's last micro-batch, when the backward of every other one has
    run. So a micro-batch's loss is its token sum over a scale c that every process shares (the
    mean target count of the step's first micro-batch: a loss of the usual size for mixed
    precision); Lightning divides it by A and DDP/FSDP average the gradients over W. After the
    last backward the gradients are sum(grad of token sums) / (W * A * c), and :meth:`finish`
    multiplies them by W * A * c / N. (transformers' Trainer reaches the same by reading the
    step's batches ahead: ``num_items_in_batch``.)
    """

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None  # c, set by the step's first micro-batch
        self.step_loss = StepLoss()

    def micro_batch_loss(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = unpadded(module, batch)
        labels = batch["labels"]
        logits = module(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # transformers' ForCausalLMLoss with reduction "sum" (labels shifted by padding, -100
        # ignored, logits upcast to float32), except that float64 logits stay float64
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
        tokens = (targets != -100).sum()
        if self.scale is None:
            strategy = module.trainer.strategy
            self.scale = (strategy.reduce(tokens.double(), reduce_op="sum") / module.trainer.world_size).clamp(min=1.0)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        token_sum = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100,
                                                      reduction="sum")
        self.step_loss.add(token_sum, tokens)
        return token_sum / self.scale.to(token_sum.dtype)

    def finish(self, module: L.LightningModule) -> None:
        """The step's gradients and logged ``train/loss`` token-weighted over the whole step."""
        tokens = self.step_loss.log(module)
        if tokens is None:  # no micro-batch ran
            return
        trainer = module.trainer
        factor = float(trainer.world_size * trainer.accumulate_grad_batches * self.scale / tokens)
        self.scale = None
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


class CausalLM(Task):
    """A decoder trained on response tokens; ``predict`` decodes with :attr:`generation`."""

    name: ClassVar[str] = "causal-lm"
    # no KV cache in training: it costs memory and hides packed rows' boundaries
    forward_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({"use_cache": False})
    prediction_file: ClassVar[str] = "predictions.jsonl"
    generates: ClassVar[bool] = True
    lm_eval: ClassVar[bool] = True
    unused_settings: ClassVar[tuple[str, ...]] = ("num_labels", "label_names")
    auto_model_class: ClassVar[str] = "AutoModelForCausalLM"
    pipeline_tag: ClassVar[str] = "text-generation"

    @classmethod
    def create(cls, num_labels: int | None = None, label_names: list[str] | None = None,
               generation: GenerationOptions | None = None) -> CausalLM:
        return cls(generation)

    def __init__(self, generation: GenerationOptions | None = None) -> None:
        super().__init__()
        self.generation = generation if generation is not None else GenerationOptions()
        self._own_tokenizer: PreTrainedTokenizerBase | None = None
        self._step = TokenWeightedStep()

    def training_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._step.micro_batch_loss(module, batch)

    def finish_gradients(self, module: L.LightningModule) -> None:
        self._step.finish(module)

    def build_metrics(self, data: MELoRADataModule | None) -> MetricCollection:
        return language_modeling_metrics()

    def eval_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor], metrics: MetricCollection,
                  prefix: str) -> None:
        batch = unpadded(module, batch)
        out = module(**batch)
        # loss and perplexity over the epoch's target tokens: the model's loss is the mean over
        # this batch's targets (labels shifted by one, -100 ignored), so weigh it by their count
        num_tokens = (batch["labels"][:, 1:] != -100).sum()
        metrics.update(out.loss.detach().float() * num_tokens, num_tokens)
        module.log_dict(metrics, prog_bar=True, on_epoch=True, add_dataloader_idx=False,
                        batch_size=len(batch["input_ids"]))

    def predict_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, list]:
        # the data module's tokenizer made the prompts; without one, the backbone's
        tokenizer = module.data.tokenizer if module.data is not None else self.tokenizer(module.hparams)
        return {"response": generate(module.model, tokenizer, self.generation, batch["input_ids"],
                                     batch.get("attention_mask"))}

    def tokenizer(self, hparams: Any) -> PreTrainedTokenizerBase:
        """The backbone's own tokenizer (pad token set), for predict without a data module."""
        if self._own_tokenizer is None:
            from transformers import AutoTokenizer

            source = BackboneSource(hparams.model_name_or_path, gguf_file=hparams.get("gguf_file"))
            tok = AutoTokenizer.from_pretrained(source.path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._own_tokenizer = tok
        return self._own_tokenizer


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, options: GenerationOptions,
             input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
    """Responses to a batch of left-padded prompts, decoded without special tokens and stripped;
    stops at the tokenizer's EOS token."""
    from transformers import GenerationConfig

    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate() needs left-padded prompts (the last position of a row is padding)")
    g = options
    config: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample,
                              "repetition_penalty": g.repetition_penalty,
                              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if g.do_sample:
        config.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    else:  # a model's own sampling defaults would only draw warnings in greedy mode
        config.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=GenerationConfig(**config))
    return [text.strip() for text in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
