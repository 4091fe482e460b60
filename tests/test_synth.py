import hashlib
import json

import pytest

from phiedge import catalog
from phiedge.checkpoints.checkpoint import head_dim, inspect
from phiedge.checkpoints.synth import Shrink, shaped_config, synth
from phiedge.errors import ConfigError, ModelError


def test_unshrunk_shape_is_the_published_one():
    v = catalog.find_variant("phi-4-mini")
    cfg = shaped_config(v, Shrink())
    for key, value in v.config.items():
        assert cfg[key] == value, key


@pytest.mark.parametrize("name, heads, expect_kv", [("phi-4-mini", 6, 2), ("phi-3-medium", 8, 2), ("phi-2", 4, 4)])
def test_shrinking_keeps_head_dim_rotary_and_gqa(name, heads, expect_kv):
    v = catalog.find_variant(name)
    cfg = shaped_config(v, Shrink(layers=2, heads=heads))
    assert head_dim(cfg) == head_dim(v.config)
    assert cfg["hidden_size"] == heads * head_dim(v.config)
    assert cfg["num_key_value_heads"] == expect_kv  # the published query/key-value group size is kept
    assert cfg.get("partial_rotary_factor") == v.config.get("partial_rotary_factor")
    assert cfg.get("rope_scaling") == v.config.get("rope_scaling")
    assert cfg["num_hidden_layers"] == 2


def test_checkpoint_is_complete_and_consistent(checkpoints):
    from transformers import AutoConfig, AutoTokenizer

    path = checkpoints["phi-4-mini"]
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert config.tie_word_embeddings and config.rope_scaling["type"] == "longrope"
    assert len(tok) <= config.vocab_size == 2048
    fmt = catalog.chat_formats()["phi4-mini"]
    assert tok.convert_ids_to_tokens(config.eos_token_id) == fmt.config_eos
    assert tok.convert_ids_to_tokens(config.bos_token_id) == fmt.bos_token
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    ck = inspect(path)
    assert ck.variant == "phi-4-mini" and ck.shrunk


def test_weights_load_in_transformers_without_missing_keys(checkpoints):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(checkpoints["phi-2"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # biases are exercised, not zero


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    shrink = Shrink(layers=1, heads=3, kv_heads=1, intermediate=256, vocab=1024)
    a = synth("phi-4-mini", tmp_path / "a", shrink, seed=3)
    b = synth("phi-4-mini", tmp_path / "b", shrink, seed=3)
    synth("phi-4-mini", tmp_path / "c", shrink, seed=4)
    da, db, dc = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert da == db
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]
    assert a["params"] == b["params"]


def test_vocab_colliding_with_a_layer_width_is_refused(tmp_path):
    # phi-4-mini shrunk to 3 heads: qkv width (3 + 2*1) * 128 = 640
    with pytest.raises(ConfigError, match="qkv_proj"):
        synth("phi-4-mini", tmp_path / "x", Shrink(layers=1, heads=3, kv_heads=1, intermediate=256, vocab=640))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shrink, words", [
    (Shrink(vocab=100), "too small"),
    (Shrink(heads=4, kv_heads=3), "not a multiple"),
    (Shrink(layers=0), "at least 1"),
])
def test_bad_shapes_are_refused_with_nothing_written(tmp_path, shrink, words):
    with pytest.raises(ConfigError, match=words):
        synth("phi-4-mini", tmp_path / "x", shrink)
    assert list(tmp_path.iterdir()) == []


def test_unbuildable_variant_is_refused(tmp_path):
    with pytest.raises(ModelError, match="cannot be built yet"):
        synth("phi-3.5-moe", tmp_path / "x")


def test_large_checkpoints_are_sharded(tmp_path, monkeypatch):
    from phiedge.checkpoints import synth as synth_mod

    monkeypatch.setattr(synth_mod, "SHARD_BYTES", 200_000)
    synth("phi-3-mini-4k", tmp_path / "s", Shrink(layers=2, heads=2, intermediate=256, vocab=1024))
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "s" / f).is_file() for f in files)
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not info["missing_keys"]


def test_shards_are_written_as_they_fill(tmp_path, monkeypatch):
    """A shard goes to disk before the next one's tensors are made: Phi-4's 29 GB never sit in memory."""
    import safetensors.torch

    from phiedge.checkpoints import synth as synth_mod

    events = []
    make, save = synth_mod._tensor, safetensors.torch.save_file
    monkeypatch.setattr(synth_mod, "SHARD_BYTES", 2 * 1024**2)
    monkeypatch.setattr(synth_mod, "_tensor", lambda name, *a: events.append("make") or make(name, *a))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: events.append("save") or save(*a, **k))
    out = synth("phi-4-mini", tmp_path / "c", Shrink(layers=2, heads=3, kv_heads=1, intermediate=512, vocab=2048))
    shards = sorted((tmp_path / "c").glob("model-*.safetensors"))
    assert len(shards) == events.count("save") > 2
    assert events.index("save") < len(events) - events[::-1].index("make") - 1  # saved before the last make
    assert inspect(out["path"]).config["num_hidden_layers"] == 2
