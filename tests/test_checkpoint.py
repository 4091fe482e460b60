import json
import shutil
import struct

import pytest

from phiedge.checkpoints.checkpoint import inspect, lm_head_collisions
from phiedge.errors import ModelError

EMPTY_SAFETENSORS = struct.pack("<Q", 2) + b"{}"  # a valid file with no tensors


@pytest.fixture
def copy(checkpoints, tmp_path):
    def make(variant="phi-4-mini"):
        dest = tmp_path / "ckpt"
        shutil.copytree(checkpoints[variant], dest)
        return dest
    return make


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        inspect(tmp_path / "nope")


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        inspect(tmp_path / "f")


def test_empty_folder_has_no_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        inspect(tmp_path)


def test_corrupt_config(copy):
    folder = copy()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        inspect(folder)


def test_non_phi_architecture(copy):
    folder = copy()
    edit_config(folder, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelError, match="LlamaForCausalLM is not a Phi model"):
        inspect(folder)


def test_known_but_unbuildable_phi_says_why(copy):
    folder = copy()
    edit_config(folder, architectures=["PhiMoEForCausalLM"])
    with pytest.raises(ModelError, match="phi-3.5-moe.*cannot be built yet: .*CUDA"):
        inspect(folder)


def test_no_weights(copy):
    folder = copy()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        inspect(folder)


def test_no_tokenizer(copy):
    folder = copy()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        inspect(folder)


def test_a_shard_the_index_names_must_be_there(copy):
    """A snapshot an interrupted download left (huggingface_hub answers offline with whatever it has)."""
    folder = copy()
    weight_map = {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelError, match=r"names 1 shard\(s\) the folder lacks \(model-00002-of-00002.safetensors\)"):
        inspect(folder)
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ModelError, match="not a readable safetensors index"):
        inspect(folder)


def test_vocab_that_the_builder_would_mistake_for_a_layer(copy):
    folder = copy()
    edit_config(folder, vocab_size=512 * 2)  # gate_up_proj width of this shrunk model
    with pytest.raises(ModelError, match="gate_up_proj"):
        inspect(folder)


def test_real_shapes_never_collide():
    from phiedge import catalog

    for v in catalog.variants().values():
        if v.buildable:
            assert lm_head_collisions(v.config) == [], v.name


def test_custom_code_is_noted_not_run(copy, tmp_path):
    """Reading a checkpoint whose config and tokenizer name code of its own: inspect, the parameter shapes,
    the PyTorch reference and both tokenizer loads use transformers' classes; the code is never imported."""
    from transformers import Phi3ForCausalLM

    from phiedge.checkpoints.checkpoint import parameter_shapes
    from phiedge.checkpoints.corpus import eval_ids
    from phiedge.checkpoints.fp32 import load_reference

    folder = copy()
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('custom code imported')\n"
    for name in ("modeling_phi3.py", "configuration_phi3.py", "tokenization_phi3.py"):
        (folder / name).write_text(code)
    edit_config(folder, auto_map={"AutoConfig": "configuration_phi3.Phi3Config",
                                  "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"})
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_phi3.Tok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    checkpoint = inspect(folder)
    assert "never runs remote code" in checkpoint.notes[0]
    assert parameter_shapes(checkpoint.config)
    assert type(load_reference(folder)) is Phi3ForCausalLM
    assert type(load_reference(folder, layerwise=True)) is Phi3ForCausalLM
    assert len(eval_ids(folder, 64)) == 64
    assert not marker.exists()


def test_published_shape_is_recognised(tmp_path):
    from phiedge import catalog

    v = catalog.find_variant("phi-3-mini-4k")
    (tmp_path / "config.json").write_text(json.dumps(v.config))
    (tmp_path / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    (tmp_path / "tokenizer.json").write_text("{}")
    ck = inspect(tmp_path)
    assert ck.variant == "phi-3-mini-4k" and not ck.shrunk


def test_shared_shapes_prefer_the_named_model_then_the_base(tmp_path):
    from phiedge import catalog

    cfg = dict(catalog.find_variant("phi-4-mini").config)
    (tmp_path / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert inspect(tmp_path).variant == "phi-4-mini"  # same shape as phi-4-mini-reasoning: the base
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "microsoft/Phi-4-mini-reasoning"}))
    assert inspect(tmp_path).variant == "phi-4-mini-reasoning"


def test_unshrunk_synth_is_not_marked_shrunk(tmp_path):
    from phiedge import catalog

    (tmp_path / "config.json").write_text(json.dumps(catalog.find_variant("phi-2").config))
    (tmp_path / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "phiedge_synth.json").write_text(json.dumps({"like": "phi-2"}))
    ck = inspect(tmp_path)
    assert (ck.variant, ck.shrunk) == ("phi-2", False)


def test_extended_context_without_longrope_is_refused(copy):
    folder = copy("phi-3-mini-4k")
    edit_config(folder, max_position_embeddings=32768, original_max_position_embeddings=None, rope_scaling=None)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["original_max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="without LongRoPE"):
        inspect(folder)


def test_truncated_weights_are_named(copy):
    folder = copy()
    weights = sorted(folder.glob("*.safetensors"))[0]
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(ModelError, match=rf"{weights.name} is \d+ bytes but its header describes \d+"):
        inspect(folder)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="truncated or not safetensors"):
        inspect(folder)


def test_tokenizer_beyond_the_vocabulary_is_refused(copy):
    folder = copy()
    edit_config(folder, vocab_size=1000)  # the tokenizer has 2048 ids
    with pytest.raises(ModelError, match="token id 2047, beyond config.json's vocab_size 1000"):
        inspect(folder)
