"""The causal-LM loss of an optimizer step is token-weighted over the whole effective batch: the
sum of the token losses of every micro-batch on every process, divided by their total number of
target tokens. Checked in float64 on a tiny OPT (SDPA attention, LayerNorm: float64 throughout;
Llama's RMSNorm computes in float32 whatever the input, which leaves differences of about 5e-8
between batch shapes) with samples of unequal lengths: one batch of
4, two accumulated micro-batches of 2 and two DDP processes (gloo) with 2 each give the same
gradients and the same logged ``train/loss``, equal to an independent reference (per-token cross
entropy summed over the 4 samples, divided by their target count), packed and unpacked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import run_cli, with_tests_on_path, write_run_config
from test_distributed import free_port
from test_instruct import smol_tokenizer  # noqa: F401 - session fixture

pytestmark = pytest.mark.slow

#: responses of very different lengths: their target token counts are unequal (about 2 to 20)
RESPONSES = ["cow", "a dog that barks at the postman every single morning before breakfast, loudly and often",
             "a cat", "the duck that quacks by the pond near the old mill"]
WAYS = {"batch 4": {"batch_size": 4}, "accumulate 2 x 2": {"batch_size": 2, "accumulate_grad_batches": 2},
        "DDP 2 x 2": {"batch_size": 2, "devices": 2}}
TOL = 1e-9


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory, smol_tokenizer) -> str:  # noqa: F811 - the fixture above
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_tokenizer)
    out = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    OPTForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _data(folder: Path, packed: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    if not packed:  # 4 instruction records, one step of 4 samples whatever the way
        rows = [{"instruction": f"Describe animal {i}.", "input": "", "output": r} for i, r in enumerate(RESPONSES)]
        (folder / "train.json").write_text(json.dumps(rows))
        (folder / "val.json").write_text(json.dumps(rows[:2]))
        return {"class_path": "melora_lit.data.InstructionDataModule",
                "init_args": {"train_file": str(folder / "train.json"), "validation_file": str(folder / "val.json"),
                              "max_length": 64}}
    # 8 conversations packed into 4 rows of up to 130 tokens (38, 26, 9 and 3 targets)
    chats = [{"messages": [{"role": "user", "content": f"Tell me about animal {i}."},
                           {"role": "assistant", "content": r}]} for i, r in enumerate(RESPONSES * 2)]
    (folder / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (folder / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:2]))
    return {"class_path": "melora_lit.data.ChatDataModule",
            "init_args": {"train_file": str(folder / "train.jsonl"), "validation_file": str(folder / "val.jsonl"),
                          "packing": True, "max_length": 130}}


def _config(folder: Path, model: str, packed: bool, way: dict) -> Path:
    data = _data(folder, packed)
    data["init_args"]["batch_size"] = way["batch_size"]
    trainer = {"max_steps": 1, "precision": "64-true", "logger": False,
               "accumulate_grad_batches": way.get("accumulate_grad_batches", 1), "devices": way.get("devices", 1)}
    if way.get("devices", 1) > 1:
        trainer["strategy"] = "ddp"
    return write_run_config(
        folder / "config.yaml", folder, data=data, trainer=trainer,
        model={"model_name_or_path": model, "task": "causal-lm", "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "melora": {"r": 2, "n": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
    )


def first_step(folder: Path, model: str, packed: bool, way: dict) -> dict:
    cfg = _config(folder, model, packed, way)
    out = folder / "first-step.pt"
    proc = run_cli("fit", "--config", str(cfg), "--checkpoint.save_last", "false",
                   "--trainer.callbacks+=grad_probe.RecordFirstStep", "--trainer.callbacks.path", str(out),
                   env=with_tests_on_path(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1"),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**torch.load(out, weights_only=True), "config": cfg}


def reference(record: dict) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients and loss computed here from the recorded parameters and the one batch of 4:
    per-token cross entropy, summed over every target token of the 4 samples, divided by their count."""
    import importlib

    import yaml

    from melora_lit.adapter import MELoRAConfig
    from melora_lit.training.module import MELoRAModule

    cfg = yaml.safe_load(Path(record["config"]).read_text())
    model_args = dict(cfg["model"], melora=MELoRAConfig(**cfg["model"]["melora"]))
    module = MELoRAModule(**model_args)
    module_name, _, class_name = cfg["data"]["class_path"].rpartition(".")
    dm = getattr(importlib.import_module(module_name), class_name)(
        **cfg["data"]["init_args"], tokenizer=cfg["model"]["model_name_or_path"])
    module.configure_model()
    module.double()
    missing = module.load_state_dict(record["params"], strict=False)
    assert not missing.unexpected_keys and set(record["params"]) <= set(dict(module.named_parameters()))
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())  # batch size 4: the whole epoch
    labels = batch.pop("labels")
    logits = module.model(**batch, use_cache=False).logits
    targets = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    count = int((targets != -100).sum())
    loss = token_losses.sum() / count
    loss.backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, float(loss)


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    return float(diff / torch.cat([b[k].flatten() for k in b]).norm())


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_accumulation_and_ddp_give_the_token_weighted_gradient_of_one_batch(tmp_path, tiny_opt, packed):
    records = {name: first_step(tmp_path / name.replace(" ", "-"), tiny_opt, packed, way)
               for name, way in WAYS.items()}
    grads, loss = reference(records["batch 4"])
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    table = {name: (relative(r["grads"], grads), abs(r["loss"] - loss) / loss) for name, r in records.items()}
    print("\n".join(f"{name:>18}: gradient {g:.3g}, train/loss {lo:.3g} (relative to the reference)"
                    for name, (g, lo) in table.items()))
    for name, (g, lo) in table.items():
        assert g < TOL and lo < TOL, f"{name}: gradient {g:.3g}, loss {lo:.3g} apart from the reference"
