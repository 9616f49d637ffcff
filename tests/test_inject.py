"""inject_melora / merge_melora on tiny transformers models built from configs (no download)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from melora_lit import (
    MELoRAConfig,
    MELoRALinear,
    adapter_params,
    adapter_state_dict,
    inject_melora,
    melora_layers,
    merge_melora,
)

from support import ids, run_main, sentiment_rows, tiny_bert, tiny_gpt2, tiny_llama, write_config, write_csv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in melora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def cfg(**kw) -> MELoRAConfig:
    return MELoRAConfig(**{"r": 2, "n": 4, "alpha": 8.0, "dropout": 0.0, **kw})


def injected(model, **kw) -> set[str]:
    inject_melora(model, cfg(**kw))
    return set(melora_layers(model))


BERT_QV = {f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")}


# --------------------------------------------------------------------------- target matching


def test_target_last_component():
    assert injected(tiny_bert(), target_modules=["query", "value"]) == BERT_QV


def test_target_single_string_is_one_pattern():
    assert injected(tiny_bert(), target_modules="query") == {
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)}


def test_target_dotted_suffix():
    assert injected(tiny_bert(), target_modules=["self.value"]) == {
        f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)}
    assert injected(tiny_bert(), target_modules=["1.attention.self.key"]) == {
        "bert.encoder.layer.1.attention.self.key"}
    # a suffix must end on a component boundary: "uery" is not "query"
    with pytest.raises(ValueError, match="matched no linear layer"):
        inject_melora(tiny_bert(), cfg(target_modules=["uery"]))


def test_target_full_path():
    name = "bert.encoder.layer.0.attention.output.dense"
    assert injected(tiny_bert(), target_modules=[name]) == {name}


def test_target_regex():
    got = injected(tiny_bert(), target_modules=[r".*layer\.1\..*\.(query|key)"])
    assert got == {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"}


def test_all_linear_excludes_output_heads():
    bert = tiny_bert()
    expected = linear_names(bert) - {"classifier"}
    assert "bert.pooler.dense" in expected and len(expected) == 2 * 6 + 1
    assert injected(bert, target_modules="all-linear") == expected

    gpt2 = tiny_gpt2()
    expected = linear_names(gpt2) - {"lm_head"}
    assert len(expected) == 8
    assert injected(gpt2, target_modules="all-linear") == expected
    assert all(type(m.base).__name__ == "Conv1D" for m in melora_layers(gpt2).values())

    llama = tiny_llama()
    expected = linear_names(llama) - {"lm_head"}
    got = injected(llama, target_modules="all-linear", n=2)
    assert got == expected and len(got) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in got} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"}


def test_exclude_modules():
    got = injected(tiny_bert(), target_modules="all-linear", exclude_modules=["key", r".*layer\.0\..*"])
    expected = {n for n in linear_names(tiny_bert()) - {"classifier"}
                if not n.endswith(".key") and ".layer.0." not in n}
    assert got == expected and len(got) == 6


def test_rank_and_n_patterns():
    model = tiny_bert()
    summary = inject_melora(model, cfg(
        r=2, n=4, target_modules=["query", "value"],
        rank_pattern={"value": 1, r".*layer\.1\.attention\.self\.query": 4},
        n_pattern={"layer.1.attention.self.value": 8, "layer.0.attention.self.query": 2},
    ))
    want = {  # name: (n, r)
        "bert.encoder.layer.0.attention.self.query": (2, 2),
        "bert.encoder.layer.1.attention.self.query": (4, 4),
        "bert.encoder.layer.0.attention.self.value": (4, 1),
        "bert.encoder.layer.1.attention.self.value": (8, 1),
    }
    layers = melora_layers(model)
    assert set(layers) == set(want)
    for name, (n, r) in want.items():
        layer = layers[name]
        assert (layer.n, layer.r) == (n, r)
        assert layer.lora_A.shape == (n, r, 32 // n) and layer.lora_B.shape == (n, 32 // n, r)
        assert layer.scaling == pytest.approx(8.0 / r)
        assert summary.modules[name] == {"d_in": 32, "d_out": 32, "n": n, "r": r, "rank": n * r}
    assert summary.adapter_params == sum(2 * 32 * r for n, r in want.values())


def test_pattern_keys_select_modules_as_peft_does():
    """rank_pattern/n_pattern keys follow PEFT's rule (a regex on the end of the module path, the
    first matching key wins), checked against PEFT's own get_pattern_key."""
    from peft.utils.other import get_pattern_key

    rank_pattern = {r"layer\.1\..*value": 1, "query": 4, r"0\.attention\.self\.value": 8}
    n_pattern = {r"(self\.)?value": 2, r"encoder\.layer\.\d\.attention\.self\.query": 1}
    model = tiny_bert()
    summary = inject_melora(model, cfg(r=2, n=4, target_modules=["query", "value"], rank_pattern=rank_pattern,
                                       n_pattern=n_pattern))
    assert len(summary.modules) == 4
    for name, s in summary.modules.items():
        assert s["r"] == rank_pattern.get(get_pattern_key(list(rank_pattern), name), 2), name
        assert s["n"] == n_pattern.get(get_pattern_key(list(n_pattern), name), 4), name
    # the regex key on a suffix does select (a full-path match would not): layer 1's value has r=1
    assert summary.modules["bert.encoder.layer.1.attention.self.value"]["r"] == 1


def test_modules_to_save_trainable_and_in_adapter_state():
    model = tiny_bert()
    summary = inject_melora(model, cfg(target_modules=["query"], modules_to_save=["classifier"]))
    assert summary.modules_to_save == ["classifier"]
    cls_keys = {f"classifier.{k}" for k in model.classifier.state_dict()}
    assert cls_keys == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in model.classifier.parameters())
    sd = adapter_state_dict(model, summary.modules_to_save)
    assert cls_keys <= set(sd)
    # the explicit contract: the summary holds the config, the model holds nothing but its layers
    assert summary.config.modules_to_save == ["classifier"]
    assert not [k for k in vars(model) if "melora" in k]
    params = adapter_params(model, summary.modules_to_save)
    assert set(params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(sd) and all(params[k] is dict(model.named_parameters())[k] for k in params)
    assert sum(p.numel() for p in params.values()) == summary.trainable_params
    n_cls = sum(p.numel() for p in model.classifier.parameters())
    assert summary.trainable_params == summary.adapter_params + n_cls
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    # a module inside a saved module is trained in full, not adapted
    model2 = tiny_bert()
    got = injected(model2, target_modules="all-linear", modules_to_save=["bert.pooler"])
    assert "bert.pooler.dense" not in got
    assert model2.bert.pooler.dense.weight.requires_grad


@pytest.mark.parametrize("make, config", [
    (tiny_bert, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    (tiny_gpt2, {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}),  # lm_head tied to wte
    (tiny_llama, {"target_modules": "all-linear", "modules_to_save": ["model.norm"]}),
])
def test_one_trainable_set_for_the_optimizer_the_checkpoint_and_the_counts(make, config):
    from melora_lit.adapter.inject import is_adapter_key
    from melora_lit.training.optim import parameter_groups

    model = make()
    summary = inject_melora(model, cfg(**config))
    saved = summary.modules_to_save
    params = adapter_params(model, saved)
    # what trains: exactly the parameters inject_melora left trainable, in the model's order
    assert list(params) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert summary.trainable_params == sum(p.numel() for p in params.values())
    groups = parameter_groups(model, saved, 1e-3, 5e-3, 0.01)
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, params.values())) and len(grouped) == len(params)
    for g in groups:  # each group in the model's order
        order = [list(map(id, params.values())).index(id(p)) for p in g["params"]]
        assert order == sorted(order)
    # what is saved: the same tensors, by state-dict key (a tied head under its own name too)
    state = adapter_state_dict(model, saved)
    assert {id(t) for t in state.values() if isinstance(t, nn.Parameter)} <= set(map(id, params.values()))
    assert all(is_adapter_key(k, melora_layers(model), saved) for k in state)
    if make is tiny_gpt2:  # the tied head's weight trains under the embeddings' name, at their rate
        assert "transformer.wte.weight" in params and "lm_head.weight" in state
        assert next(g["lr"] for g in groups if any(p is params["transformer.wte.weight"] for p in g["params"])) == 1e-3


def test_a_saved_module_keeps_its_name_inside_torch_wrappers():
    from melora_lit.adapter.inject import is_adapter_key

    saved = ["bert.encoder.layer.0.output.LayerNorm"]
    assert is_adapter_key("bert.encoder.layer.0._fsdp_wrapped_module.output.LayerNorm.weight", (), saved)
    assert is_adapter_key("bert.encoder.layer.0._checkpoint_wrapped_module.output.LayerNorm.bias", (), saved)
    assert not is_adapter_key("bert.encoder.layer.0.x_orig_mod.output.LayerNorm.bias", (), saved)


# --------------------------------------------------------------------------- gradients


@pytest.mark.slow
@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_gradients_reach_only_adapter_and_saved_modules(builder):
    model = builder()
    save = ["classifier"] if builder is tiny_bert else []
    target = ["query", "value"] if builder is tiny_bert else ["c_attn", "c_fc"]
    inject_melora(model, cfg(target_modules=target, modules_to_save=save, dropout=0.1))
    randomize_adapters(model)
    model.train()
    x = ids()
    out = model(input_ids=x, labels=torch.tensor([0, 1, 2]) if save else x)
    out.loss.backward()
    n_lora = n_saved = 0
    for name, p in model.named_parameters():
        is_lora = name.endswith(".lora_A") or name.endswith(".lora_B")
        is_saved = any(name.startswith(s + ".") for s in save)
        if is_lora or is_saved:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            n_lora += is_lora
            n_saved += is_saved
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
    assert n_lora == 2 * 4 and n_saved == 2 * len(save)


# --------------------------------------------------------------------------- parameter counts


@pytest.fixture(scope="module")
def roberta_base():
    """RoBERTa-base shape (hidden 768, 12 layers), random weights, built once."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig())


ROBERTA_QV = {f"roberta.encoder.layer.{i}.attention.self.{m}" for i in range(12) for m in ("query", "value")}


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32, 64, 96, 256, 768])
def test_roberta_base_params_r1(roberta_base, n):
    model = roberta_base
    summary = inject_melora(model, MELoRAConfig(r=1, n=n, target_modules=["query", "value"]))
    try:
        assert set(summary.modules) == ROBERTA_QV
        # 24 modules x (n*1*768/n + n*768/n*1) = 24 * 1536, whatever n
        assert summary.adapter_params == 36_864
        counted = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
        assert counted == 36_864
        assert summary.trainable_params == 36_864
        assert all(s["rank"] == n and (s["n"], s["r"]) == (n, 1) for s in summary.modules.values())
        assert f"{36_864:,} adapter params" in str(summary)
    finally:
        merge_melora(model)  # B is zero: weights unchanged; back to a plain model
    assert not melora_layers(model)


def test_roberta_base_params_r8_n1_is_8x(roberta_base):
    model = roberta_base
    summary = inject_melora(model, MELoRAConfig(r=8, n=1, target_modules=["query", "value"]))
    try:
        assert summary.adapter_params == 294_912 == 8 * 36_864
        assert all(s["rank"] == 8 for s in summary.modules.values())
    finally:
        merge_melora(model)


@pytest.mark.parametrize("n, r", [(8, 1), (4, 2), (1, 8)])
def test_equivalent_rank_is_n_times_r(n, r):
    """The summary's rank is the real rank of the update (checked by SVD)."""
    model = tiny_bert(hidden=64)
    summary = inject_melora(model, cfg(n=n, r=r, target_modules=["value"]))
    randomize_adapters(model)
    for name, layer in melora_layers(model).items():
        assert summary.modules[name]["rank"] == n * r
        assert int(torch.linalg.matrix_rank(layer.delta_weight().double(), rtol=1e-4)) == n * r
    assert summary.adapter_params == 2 * 2 * 64 * r  # same budget as a rank-r LoRA


# --------------------------------------------------------------------------- errors


def one_line_error(model, config_kwargs=None, config=None, match=""):
    with pytest.raises(ValueError, match=match) as e:
        inject_melora(model, config if config is not None else cfg(**config_kwargs))
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [type(m) for m in model.modules()])


def assert_unchanged(model, snap):
    sd, rg, types = snap
    assert not melora_layers(model)
    assert not any(isinstance(m, MELoRALinear) for m in model.modules())
    assert [type(m) for m in model.modules()] == types
    assert {k: p.requires_grad for k, p in model.named_parameters()} == rg
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], sd[k]) for k in sd)
    assert not [k for k in vars(model) if "melora" in k]


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["nonexistent"]),
     r"target_modules=\['nonexistent'\] matched no linear layer; some linear layers that exist: .*query"),
    (dict(n=3), r"n=3 does not divide d_in=32 and d_out=32; n must be one of 1, 2, 4, 8, 16, 32"),
    (dict(n=8, r=8), r"n\*r=8\*8=64 exceeds min\(d_in, d_out\)=32"),
    (dict(n_pattern={"layer.1.attention.self.value": 3}),
     r"bert\.encoder\.layer\.1\.attention\.self\.value: n=3 does not divide"),
    (dict(rank_pattern={"value": 16}), r"attention\.self\.value: n\*r=4\*16=64 exceeds"),
    (dict(modules_to_save=["nope"]), r"modules_to_save \['nope'\] matched no module; some that exist: .*bert"),
    # a pattern key that selects no adapted module would change nothing: a typo, or a module
    # that exists but is not a target
    (dict(rank_pattern={"vaule": 1}), r"^rank_pattern key 'vaule' matches none of the 4 adapted modules "
                                      r"\(bert\.encoder\.layer\.0\.attention\.self\.query, .*as in PEFT$"),
    (dict(n_pattern={"value": 2, "key": 2}), r"^n_pattern key 'key' matches none of the 4 adapted modules"),
])
def test_inject_errors_leave_model_unchanged(kwargs, match):
    model = tiny_bert()
    snap = snapshot(model)
    one_line_error(model, {"target_modules": ["query", "value"], **kwargs}, match=match)
    assert_unchanged(model, snap)


def test_n_must_divide_d_in_and_d_out_separately():
    """FFN: d_in=32, d_out=64 (intermediate); n=64 divides d_out only."""
    msg = one_line_error(tiny_bert(), {"target_modules": ["intermediate.dense"], "n": 64, "r": 1},
                         match=r"n=64 does not divide d_in=32 and d_out=64")
    assert re.search(r"n must be one of 1, 2, 4, 8, 16, 32$", msg)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"r=0 is not valid; r must be an integer >= 1"),
    (dict(r=-2), r"r=-2 is not valid"),
    (dict(n=0), r"n=0 is not valid; n must be an integer >= 1"),
    (dict(alpha=0.0), r"alpha=0\.0 is not valid; alpha must be > 0"),
    (dict(alpha=-1.0), r"alpha=-1\.0 is not valid"),
    (dict(dropout=-0.1), r"dropout=-0\.1 is not valid; dropout must be in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout=1\.0 is not valid; dropout must be in \[0, 1\)"),
    (dict(init="xavier"), r"init='xavier' is not valid"),
    (dict(rank_pattern={"query": 0}), r"pattern 'query' sets 0"),
    (dict(n_pattern={"layer.(0": 2}), r"n_pattern key 'layer\.\(0' is not a valid regular expression"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        cfg(**kwargs)
    assert "\n" not in str(e.value)


def test_inject_twice_fails_and_keeps_first():
    model = tiny_bert()
    inject_melora(model, cfg(target_modules=["query"]))
    before = set(melora_layers(model))
    one_line_error(model, {"target_modules": ["value"]}, match=r"model already has 2 MELoRA layers")
    assert set(melora_layers(model)) == before
    # no MELoRA layer wraps another one
    assert not any(isinstance(m.base, MELoRALinear) for m in melora_layers(model).values())


# --------------------------------------------------------------------------- merge_melora


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_merge_melora_gives_plain_model_and_round_trips(builder, tmp_path):
    model = builder()
    target = {tiny_bert: ["query", "value"], tiny_gpt2: ["c_attn", "c_proj"],
              tiny_llama: ["q_proj", "v_proj"]}[builder]
    original = {n: type(m) for n, m in model.named_modules()}
    plain = copy.deepcopy(model)
    inject_melora(model, cfg(target_modules=target, modules_to_save=["classifier"] if builder is tiny_bert else []))
    randomize_adapters(model)
    model.eval()
    x = ids()
    with torch.no_grad():
        y = model(input_ids=x).logits
        assert (y - plain(input_ids=x).logits).abs().max() > 1e-3  # the adapter does something

    merged = merge_melora(model)
    assert merged is model
    assert {n: type(m) for n, m in merged.named_modules()} == original
    assert not any(type(m).__module__.startswith("melora_lit") for m in merged.modules())
    assert not any(isinstance(m, MELoRALinear) for m in merged.modules())
    assert all("lora_" not in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        ym = merged(input_ids=x).logits
    assert float((ym - y).norm() / y.norm()) < 1e-5

    merged.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    assert not any(type(m).__module__.startswith("melora_lit") for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, ym, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_cli_refuses_a_pattern_key_that_selects_nothing(tmp_path, dropout_bert):
    """A rank_pattern key copied with a typo: one line naming the key and the rule, exit 2, and
    the earlier run folder untouched."""
    runs = tmp_path / "runs"
    earlier = runs / "lightning_logs" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(bytes(range(256)) * 4)
    (earlier / "config.yaml").write_text("seed_everything: 1\n")
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    melora = {"r": 2, "n": 2, "alpha": 4, "target_modules": ["query", "value"],
              "rank_pattern": {r"layer\.0\.attention\.self\.vaule": 1}}
    cfg = write_config(tmp_path / "config.yaml", dropout_bert, write_csv(tmp_path / "train.csv", sentiment_rows(32, 1)),
                       runs, model_args={"melora": melora})
    proc = run_main("fit", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("melora-lit: error:")]
    assert errors == [r"melora-lit: error: rank_pattern key 'layer\.0\.attention\.self\.vaule' matches none of "
                      "the 4 adapted modules (bert.encoder.layer.0.attention.self.query, "
                      "bert.encoder.layer.0.attention.self.value, bert.encoder.layer.1.attention.self.query, ...); "
                      "a key is a regular expression matched against the end of a module path, as in PEFT"]
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before


_WITHOUT_LIGHTNING = """
import sys

class Block:  # any import of these packages fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning", "transformers"):
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
from collections import OrderedDict
import torch
from torch import nn
from melora_lit.adapter import MELoRAConfig, adapter_state_dict, inject_melora, merge_melora, save_adapter

torch.manual_seed(0)
model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
summary = inject_melora(model, MELoRAConfig(r=1, n=2, target_modules=["q"], modules_to_save=["head"]))
save_adapter(model, sys.argv[1], summary.config)
print(sorted(adapter_state_dict(model, summary.modules_to_save)))
merge_melora(model)
print(type(model.q).__name__)
"""


@pytest.mark.slow
def test_the_adapter_imports_and_works_without_lightning_or_transformers(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_LIGHTNING, str(tmp_path / "adapter")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["['head.bias', 'head.weight', 'q.lora_A', 'q.lora_B']", "Linear"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
