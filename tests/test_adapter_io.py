"""Adapter state, adapter directories, and the export to a standard PEFT LoRA adapter."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import melora_lit
from melora_lit import (
    MELoRAConfig,
    adapter_state_dict,
    export_peft_lora,
    inject_melora,
    load_adapter,
    load_adapter_config,
    load_adapter_state_dict,
    melora_layers,
    save_adapter,
)

from support import VOCAB, ids, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def randomize(model: nn.Module, saved: list[str] = (), seed: int = 1) -> None:
    """Non-zero adapters and changed saved modules, so that loading them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in melora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        for s in saved:
            for p in model.get_submodule(s).parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


QV = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
SAVED = ["classifier"]  # the modules_to_save of the `adapted` fixture


@pytest.fixture
def adapted():
    """(tiny BERT with MELoRA on query+value and a saved classifier, its config, a copy of the base)."""
    model = tiny_bert()
    base = copy.deepcopy(model)
    config = MELoRAConfig(r=2, n=4, alpha=8.0, dropout=0.1, target_modules=["query", "value"],
                          modules_to_save=SAVED)
    assert inject_melora(model, config).modules_to_save == SAVED
    randomize(model, ["classifier"])
    return model.eval(), config, base


# --------------------------------------------------------------------------- adapter_state_dict


def test_adapter_state_dict_keys(adapted):
    model, _, _ = adapted
    sd = adapter_state_dict(model, SAVED)
    expected = {f"{m}.{p}" for m in QV for p in ("lora_A", "lora_B")} | {"classifier.weight", "classifier.bias"}
    assert set(sd) == expected
    for m in QV:
        assert sd[f"{m}.lora_A"].shape == (4, 2, 8) and sd[f"{m}.lora_B"].shape == (4, 8, 2)
    # no frozen base weight leaks in
    assert not any(k.endswith("base.weight") or k.startswith("bert.embeddings") for k in sd)


def test_adapter_state_dict_without_saved_modules():
    model = tiny_bert()
    summary = inject_melora(model, MELoRAConfig(r=1, n=2, target_modules=["key"]))
    assert summary.modules_to_save == []
    assert set(adapter_state_dict(model, summary.modules_to_save)) == {
        f"bert.encoder.layer.{i}.attention.self.key.{p}" for i in range(2) for p in ("lora_A", "lora_B")}


def test_load_adapter_state_dict_restores_outputs(adapted):
    model, config, base = adapted
    sd = {k: v.clone() for k, v in adapter_state_dict(model, SAVED).items()}
    x = ids()
    want = logits(model, x)
    fresh = copy.deepcopy(base)
    inject_melora(fresh, config)
    assert not torch.allclose(logits(fresh.eval(), x), want)
    load_adapter_state_dict(fresh, sd, SAVED)
    assert torch.equal(logits(fresh.eval(), x), want)


def _error(model, sd, match):
    with pytest.raises(ValueError, match=match) as e:
        load_adapter_state_dict(model, sd, SAVED)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_load_adapter_state_dict_missing_key(adapted):
    model, _, _ = adapted
    sd = dict(adapter_state_dict(model, SAVED))
    del sd["bert.encoder.layer.1.attention.self.value.lora_B"]
    _error(model, sd, r"missing key 'bert\.encoder\.layer\.1\.attention\.self\.value\.lora_B'")
    sd2 = dict(adapter_state_dict(model, SAVED))
    del sd2["classifier.bias"]
    _error(model, sd2, r"missing key 'classifier\.bias'")


def test_load_adapter_state_dict_unexpected_key(adapted):
    model, _, _ = adapted
    sd = dict(adapter_state_dict(model, SAVED))
    sd["bert.encoder.layer.0.attention.self.key.lora_A"] = torch.zeros(4, 2, 8)
    _error(model, sd, r"unexpected key 'bert\.encoder\.layer\.0\.attention\.self\.key\.lora_A'")


def test_load_adapter_state_dict_shape_mismatch_leaves_model_unchanged(adapted):
    model, _, _ = adapted
    before = {k: v.clone() for k, v in adapter_state_dict(model, SAVED).items()}
    sd = {k: torch.zeros_like(v) for k, v in before.items()}
    key = "bert.encoder.layer.0.attention.self.query.lora_A"
    sd[key] = torch.zeros(2, 2, 16)  # n=2 instead of n=4
    msg = _error(model, sd, r"bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A")
    assert "(4, 2, 8)" in msg and "(2, 2, 16)" in msg
    after = adapter_state_dict(model, SAVED)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing half-loaded


def test_load_adapter_state_dict_into_plain_model():
    with pytest.raises(ValueError, match="no MELoRA layers"):
        load_adapter_state_dict(tiny_bert(), {}, [])


# --------------------------------------------------------------------------- save_adapter / load_adapter


def test_save_and_load_adapter_directory(adapted, tmp_path):
    model, config, base = adapted
    x = ids()
    want = logits(model, x)
    out = save_adapter(model, tmp_path / "ad", config, base_model_name_or_path="tiny-bert-test")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()

    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["melora_config"] == {
        "r": 2, "n": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["query", "value"],
        "exclude_modules": [], "modules_to_save": ["classifier"], "init": "kaiming",
        "rank_pattern": {}, "n_pattern": {},
    }
    assert meta["base_model_name_or_path"] == "tiny-bert-test"
    assert meta["melora_lit_version"] == melora_lit.__version__
    assert load_adapter_config(out)[0] == config

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["melora_lit_version"] == melora_lit.__version__
    assert keys == set(adapter_state_dict(model, SAVED))

    fresh = copy.deepcopy(base)  # same base weights, no adapter
    assert not torch.allclose(logits(fresh, x), want)
    loaded = load_adapter(fresh, out)
    assert loaded is fresh
    assert set(melora_layers(fresh)) == set(QV)
    assert torch.equal(logits(fresh.eval(), x), want)


def test_save_adapter_base_name_from_model_config(tmp_path):
    model = tiny_bert()
    model.config._name_or_path = "org/some-bert"
    summary = inject_melora(model, MELoRAConfig(r=1, n=2, target_modules=["query"]))
    save_adapter(model, tmp_path, summary.config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/some-bert"


def test_save_adapter_requires_melora(tmp_path):
    with pytest.raises(ValueError, match="no MELoRA layers"):
        save_adapter(tiny_bert(), tmp_path, MELoRAConfig())
    with pytest.raises(ValueError, match="no MELoRA layers"):
        export_peft_lora(tiny_bert(), tmp_path, MELoRAConfig())


def test_load_adapter_config_rejects_other_dirs(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not a melora_lit adapter config"):
        load_adapter_config(tmp_path)


# --------------------------------------------------------------------------- PEFT export


def _peft_round_trip(model, config, base, tmp_path, x):
    from peft import PeftModel

    want = logits(model, x)
    export_peft_lora(model, tmp_path / "peft", config)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    got = logits(peft_model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=x).logits
    assert (plain - want).abs().max() > 1e-3  # the comparison is not vacuous
    return peft_model


def _peft_lora_layers(peft_model) -> dict:
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def test_export_peft_bert_seq_cls_with_classifier(adapted, tmp_path):
    model, config, base = adapted
    peft_model = _peft_round_trip(model, config, base, tmp_path, ids())
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32.0  # rank n*r, alpha*n keeps the scale alpha/r
    layers = _peft_lora_layers(peft_model)
    assert set(layers) == set(QV)
    for m in layers.values():
        assert m.r["default"] == 8 and m.scaling["default"] == pytest.approx(config.alpha / config.r)
    # the trained classifier came through (fresh base has another one)
    cls = peft_model.base_model.model.classifier
    torch.testing.assert_close(cls.modules_to_save["default"].weight, model.classifier.weight)


def test_export_peft_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    summary = inject_melora(model, MELoRAConfig(r=2, n=4, alpha=6.0, dropout=0.0, target_modules=["c_attn", "c_proj"]))
    randomize(model)
    assert any(m.d_in != m.d_out for m in melora_layers(model).values())  # c_attn: 32 -> 96
    peft_model = _peft_round_trip(model.eval(), summary.config, base, tmp_path, ids())
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"
    assert len(_peft_lora_layers(peft_model)) == 6


def test_export_peft_per_module_n_pattern(tmp_path):
    model = tiny_bert()
    base = copy.deepcopy(model)
    config = MELoRAConfig(r=2, n=4, alpha=8.0, dropout=0.0, target_modules=["query", "value"],
                          n_pattern={"value": 2}, rank_pattern={"layer.1.attention.self.query": 1})
    inject_melora(model, config)
    randomize(model)
    peft_model = _peft_round_trip(model.eval(), config, base, tmp_path, ids())
    want = {  # name: (PEFT rank n*r, scaling alpha/r)
        "bert.encoder.layer.0.attention.self.query": (8, 4.0),
        "bert.encoder.layer.1.attention.self.query": (4, 8.0),
        "bert.encoder.layer.0.attention.self.value": (4, 4.0),
        "bert.encoder.layer.1.attention.self.value": (4, 4.0),
    }
    layers = _peft_lora_layers(peft_model)
    assert set(layers) == set(want)
    for name, (rank, scaling) in want.items():
        assert layers[name].r["default"] == rank, name
        assert layers[name].scaling["default"] == pytest.approx(scaling), name
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] or cfg["alpha_pattern"]
    # no modules_to_save in the MELoRA config, but PEFT's SEQ_CLS model wraps the classifier
    # anyway and needs its weights in the file: the export carries the (frozen) head
    assert cfg["modules_to_save"] == ["classifier"]


def test_export_peft_roberta_nested_head(tmp_path):
    """RoBERTa's classifier is a module with its own dense/out_proj: saved as a whole."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, num_labels=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    base = copy.deepcopy(model)
    summary = inject_melora(model, MELoRAConfig(r=1, n=8, alpha=4.0, dropout=0.0, target_modules="all-linear",
                                                modules_to_save=["classifier"]))
    assert not any(n.startswith("classifier") for n in melora_layers(model))
    randomize(model, ["classifier"])
    _peft_round_trip(model.eval(), summary.config, base, tmp_path, ids())
    # "dense" also names the head's unadapted classifier.dense: full paths, so PEFT adapts only these
    targets = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(melora_layers(model)) and any(t.endswith(".dense") for t in targets)


def test_export_peft_llama_q_v(tmp_path):
    model = tiny_llama()
    base = copy.deepcopy(model)
    summary = inject_melora(model, MELoRAConfig(r=2, n=4, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    shapes = {(m.d_in, m.d_out) for m in melora_layers(model).values()}
    assert shapes == {(32, 32), (32, 16)}  # v_proj: 2 kv heads of 8
    peft_model = _peft_round_trip(model.eval(), summary.config, base, tmp_path, ids())
    layers = _peft_lora_layers(peft_model)
    assert set(layers) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    # target_modules as a PEFT user writes them: the names select exactly the adapted modules
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- every supported PEFT version

ROOT = Path(__file__).resolve().parents[1]
# the oldest PEFT the project declares (the test extra's lower bound), installed by
# `scripts/setup.sh test` into its own folder beside the venv's packages
OLDEST_PEFT = re.search(r'"peft>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
OLDEST_PEFT = OLDEST_PEFT + ".0" * (2 - OLDEST_PEFT.count("."))
OLDEST_PEFT_DIR = Path(os.environ.get("MELORA_LIT_OLDEST_PEFT_DIR", Path(sys.prefix) / f"peft-{OLDEST_PEFT}"))

# Loads each export into a fresh base built by the same builder, in a process whose `peft` is
# the one on its PYTHONPATH; prints the version, the largest output difference and the warnings.
_LOAD_IN_PEFT = """
import json, sys, warnings
import peft, torch
from peft import PeftModel
import support

out = {"version": peft.__version__, "file": peft.__file__, "diff": {}, "effect": {}, "warnings": []}
for builder, folder, inputs, want in json.loads(sys.argv[1]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(getattr(support, builder)(), folder).eval()
    out["warnings"] += [str(w.message) for w in caught if "peft" in w.filename]
    with torch.no_grad():
        got = model(input_ids=torch.load(inputs)).logits
        with model.disable_adapter():
            plain = model(input_ids=torch.load(inputs)).logits
    out["diff"][builder] = float((got - torch.load(want)).abs().max())
    out["effect"][builder] = float((plain - torch.load(want)).abs().max())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def peft_exports(tmp_path_factory) -> list[list[str]]:
    """PEFT exports of a BERT classifier (per-module n and r: rank and alpha patterns), a GPT-2
    (Conv1D) and a Llama, with the adapted models' logits."""
    root = tmp_path_factory.mktemp("peft-exports")
    specs = {
        "tiny_bert": MELoRAConfig(r=2, n=4, alpha=8.0, dropout=0.1, target_modules=["query", "value"],
                                  modules_to_save=["classifier"], n_pattern={"value": 2},
                                  rank_pattern={r"layer\.1\.attention\.self\.query": 1}),
        "tiny_gpt2": MELoRAConfig(r=2, n=4, alpha=6.0, dropout=0.0, target_modules=["c_attn", "c_proj"]),
        "tiny_llama": MELoRAConfig(r=2, n=4, alpha=16.0, dropout=0.0, target_modules="all-linear"),
    }
    jobs = []
    for builder, config in specs.items():
        model = globals()[builder]()
        inject_melora(model, config)
        randomize(model, config.modules_to_save)
        x = ids()
        torch.save(x, root / f"{builder}-ids.pt")
        torch.save(logits(model.eval(), x), root / f"{builder}-want.pt")
        export_peft_lora(model, root / builder, config)
        jobs.append([builder, str(root / builder), str(root / f"{builder}-ids.pt"), str(root / f"{builder}-want.pt")])
    return jobs


def test_peft_export_holds_only_peft_keys_and_the_provenance_beside(peft_exports):
    from peft import LoraConfig

    folder = Path(peft_exports[0][1])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "melora" not in cfg and set(cfg) <= set(LoraConfig.__dataclass_fields__)
    provenance = json.loads((folder / "melora_config.json").read_text())
    assert MELoRAConfig(**provenance["converted_from"]).n_pattern == {"value": 2}
    assert provenance["melora_lit_version"] == melora_lit.__version__


@pytest.mark.slow
@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_peft_export_loads_in_the_oldest_and_newest_peft(peft_exports, which):
    """The export gives the adapted model's outputs in every PEFT version the project declares,
    without a warning about unknown config keys."""
    import peft

    path = [str(ROOT / "src"), str(ROOT / "tests")]
    if which == "oldest":
        if not (OLDEST_PEFT_DIR / "peft").is_dir():
            pytest.skip(f"peft=={OLDEST_PEFT} not installed in {OLDEST_PEFT_DIR} (scripts/setup.sh test installs it)")
        path.insert(0, str(OLDEST_PEFT_DIR))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_IN_PEFT, json.dumps(peft_exports)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == (OLDEST_PEFT if which == "oldest" else peft.__version__), out
    print(f"peft {out['version']}: max abs difference of logits {out['diff']}")
    assert set(out["diff"]) == {"tiny_bert", "tiny_gpt2", "tiny_llama"}
    assert all(d < 1e-5 for d in out["diff"].values()), out["diff"]
    assert all(e > 1e-3 for e in out["effect"].values()), out["effect"]  # the comparison is not vacuous
    assert not [w for w in out["warnings"] if "keyword" in w or "version" in w], out["warnings"]
