"""Precision and gradient checkpointing, on CPU.

``bf16-mixed``: the adapter parameters stay float32, the adapter math runs in bfloat16 (the
autocast dtype). ``bf16-true``: parameters and math in bfloat16. Either checkpoint loads into a
float32 model, and merging adds the update in float32. Gradient checkpointing (non-reentrant)
gives the gradients of a run without it, with the embeddings frozen.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from melora_lit.cli import cli_main
from melora_lit.adapter import MELoRALinear, melora_layers, merge_melora
from melora_lit.training.module import MELoRAModule

from support import csv_classification_data, sentiment_rows, write_csv, write_run_config


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("precision-data") / "train.csv", sentiment_rows(80, seed=5))


def _config(tmp_path: Path, model: str, train_csv: Path, precision: str, accelerator: str = "cpu") -> Path:
    return write_run_config(
        tmp_path / "config.yaml", tmp_path, seed=3, trainer={"accelerator": accelerator, "precision": precision},
        model={"model_name_or_path": model, "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "melora": {"r": 2, "n": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["query", "value"]}},
        data=csv_classification_data(train_csv, val_size=0.2, batch_size=16, max_length=32),
    )


class _Probe(L.Callback):
    """Records, in the first training step, the dtypes a MELoRA layer computes in and holds."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.dtype] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and not self.seen:
            layer = next(iter(melora_layers(pl_module.model).values()))
            self.seen["param"] = layer.lora_A.dtype

            def hook(module, args, out):
                self.seen.setdefault("output", out.dtype)

            self._handle = layer.register_forward_hook(hook)
            self.initial_B = {k: v.detach().float().cpu().clone() for k, v in pl_module.state_dict().items()
                              if k.endswith("lora_B")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._handle.remove()
            self.seen["loss"] = outputs["loss"].dtype
            self.first_loss = float(outputs["loss"])


def _fit(tmp_path, saved_bert, train_csv, precision, accelerator="cpu") -> tuple:
    cli = cli_main(["--config", str(_config(tmp_path, saved_bert, train_csv, precision, accelerator))], run=False)
    probe = _Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=True)
    return cli, probe, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("precision, param_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_bf16_trains_with_the_adapter_in_the_right_dtype(tmp_path, saved_bert, train_csv, precision, param_dtype):
    cli, probe, ckpt = _fit(tmp_path, saved_bert, train_csv, precision)
    # the adapter computes in bfloat16 either way; its parameters are float32 only under mixed
    assert probe.seen["output"] == torch.bfloat16
    assert probe.seen["param"] == param_dtype
    assert all(v.dtype == param_dtype for k, v in ckpt["state_dict"].items() if ".lora_" in k)
    assert cli.trainer.global_step == 4  # 64 training rows / 16
    assert torch.isfinite(torch.tensor(probe.first_loss))
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    moved = [k for k, v in probe.initial_B.items() if (ckpt["state_dict"][k].float() - v).abs().max() > 1e-3]
    assert len(moved) == len(probe.initial_B) == 8  # every lora_B left its zero init

    # the bf16 checkpoint loads into a float32 model; merging there is exact in float32
    model = MELoRAModule(saved_bert, num_labels=2, melora=cli.model.melora_config)
    model.configure_model()
    model.on_load_checkpoint(ckpt)
    model.eval()
    layer = next(iter(melora_layers(model.model).values()))
    assert layer.lora_A.dtype == torch.float32
    assert torch.equal(layer.lora_A, ckpt["state_dict"]["model." + next(iter(melora_layers(model.model))) + ".lora_A"]
                       .float())
    batch = {"input_ids": torch.tensor([[101, 2307, 2143, 102], [101, 9643, 2143, 102]]),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with torch.no_grad():
        before = model(**batch).logits
        merge_melora(model.model)
        after = model(**batch).logits
    assert not any(isinstance(m, MELoRALinear) for m in model.model.modules())
    assert torch.allclose(before, after, atol=1e-5, rtol=0), (before - after).abs().max()


def _grads(saved_bert: str, gradient_checkpointing: bool, input_grads_hook: bool = True) -> dict:
    torch.manual_seed(0)  # the same head and adapter init each time
    module = MELoRAModule(saved_bert, num_labels=2, gradient_checkpointing=gradient_checkpointing)
    module.configure_model()
    model = module.model
    if not input_grads_hook and hasattr(model, "disable_input_require_grads"):
        try:
            model.disable_input_require_grads()
        except AttributeError:
            pass  # not registered (transformers < 5)
    with torch.no_grad():
        for layer in melora_layers(model).values():
            layer.lora_B.normal_(std=0.1)  # B = 0 at init would zero A's gradient
    module.train()
    calls = []
    next(iter(melora_layers(model).values())).register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG state)
    batch = {"input_ids": torch.tensor([[101, 2307, 2143, 2055, 102], [101, 9643, 2143, 1037, 102]]),
             "attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([1, 0])}
    module(**batch).loss.backward()
    assert len(calls) == (2 if gradient_checkpointing else 1)  # checkpointed: run again in backward
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert not embeddings.requires_grad and embeddings.grad is None  # frozen, untouched
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(saved_bert):
    reference = _grads(saved_bert, gradient_checkpointing=False)
    assert len(reference) == 8 * 2 + 2 and all(g.abs().sum() > 0 for g in reference.values())
    for hook in (True, False):  # with and without enable_input_require_grads
        checkpointed = _grads(saved_bert, gradient_checkpointing=True, input_grads_hook=hook)
        assert checkpointed.keys() == reference.keys()
        for name, g in reference.items():
            assert torch.allclose(checkpointed[name], g, atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_is_on_in_the_layers_and_needs_no_input_grads(saved_bert):
    module = MELoRAModule(saved_bert, num_labels=2, gradient_checkpointing=True)
    module.configure_model()
    layers = module.model.bert.encoder.layer
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    # Why non-reentrant: the reentrant variant, with the frozen embeddings' output not
    # requiring grad, back-propagates into nothing inside the checkpointed layers.
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    plain = BertForSequenceClassification.from_pretrained(saved_bert, num_labels=2)
    from melora_lit.adapter import MELoRAConfig, inject_melora

    inject_melora(plain, MELoRAConfig(r=2, n=4, target_modules=["query"], modules_to_save=["classifier"]))
    kwargs = {"use_reentrant": True}
    if hasattr(plain, "activation_checkpointing_enable"):
        plain.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(plain, "disable_input_require_grads") and getattr(plain, "_require_grads_hook", None) is not None:
        plain.disable_input_require_grads()
    plain.train()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        out = plain(input_ids=torch.tensor([[101, 2307, 102]]), labels=torch.tensor([1]))
    out.loss.backward()
    lora = [p for n, p in plain.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is None for p in lora)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU (Lightning turns it into "
                                                          "bf16-mixed on CPU)")
def test_fp16_mixed_on_gpu(tmp_path, saved_bert, train_csv):
    """Not run on CPU-only machines. On a GPU: python -m pytest tests/test_precision.py -k fp16"""
    cli, probe, ckpt = _fit(tmp_path, saved_bert, train_csv, "16-mixed", accelerator="gpu")
    assert probe.seen["output"] == torch.float16 and probe.seen["param"] == torch.float32
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    assert "scale" in ckpt["MixedPrecision"]  # the gradient scaler's state
    assert cli.trainer.global_step == 4 and torch.isfinite(torch.tensor(probe.first_loss))
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    moved = [k for k, v in probe.initial_B.items() if (ckpt["state_dict"][k].float() - v).abs().max() > 1e-3]
    assert len(moved) == len(probe.initial_B) == 8


def test_bfloat16_backbone_with_a_float32_head_trains(saved_bert):
    """``backbone_dtype: bfloat16``: the frozen weights in bfloat16, the adapter and the head in
    float32, and the head's output agrees with a float32 head applied to the same activations."""
    torch.manual_seed(0)
    module = MELoRAModule(saved_bert, num_labels=3, backbone_dtype="bfloat16")
    module.configure_model()
    model = module.model
    assert model.bert.encoder.layer[0].attention.self.query.base.weight.dtype == torch.bfloat16
    assert model.classifier.weight.dtype == torch.float32
    pooled = {}
    model.bert.pooler.register_forward_hook(lambda m, a, out: pooled.update(x=out))
    batch = {"input_ids": torch.tensor([[101, 2307, 2143, 2055, 102], [101, 9643, 2143, 1037, 102]]),
             "attention_mask": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([2, 0])}
    module.train()
    out = module(**batch)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.dtype == torch.float32
    assert all(layer.lora_A.grad is not None for layer in melora_layers(model).values())
    # the reference: the float32 head on the pooled activations, rounded to bfloat16 once
    module.eval()
    with torch.no_grad():
        logits = module(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = torch.nn.functional.linear(pooled["x"].float(), model.classifier.weight, model.classifier.bias)
    assert torch.equal(logits, reference.to(torch.bfloat16))
