"""Method stream: the checkpoint quantized matrix by matrix, read by Olive's ModelBuilder pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.errors import ConfigError
from phiedge.quantize import prequant
from phiedge.quantize.quantizer import quantize


def ort_quantizer(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> dict[str, np.ndarray]:
    """What ONNX Runtime's MatMulNBitsQuantizer writes for MatMul(x, weight.T): the builder's default path."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    n, k = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    return {"packed": next(v for name, v in inits.items() if "_Q" in name),
            "scales": next(v for name, v in inits.items() if name.endswith("_scales")),
            "zeros": next((v for name, v in inits.items() if name.endswith("_zero_points")), None)}


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_rtn_is_onnxruntimes_quantizer_in_chunks(bits, symmetric):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 256)).astype(np.float32)
    expected = ort_quantizer(weight, bits, 32, symmetric)
    for rows in (7, 40, 8192):  # chunked reads give the same bytes as one read
        packed, scales, zeros = quantize(weight, bits, 32, symmetric, rows=rows)
        assert np.array_equal(packed, expected["packed"].reshape(40, -1))
        assert np.array_equal(scales.reshape(-1), expected["scales"].reshape(-1))
        if not symmetric:
            assert np.array_equal(zeros.reshape(-1), expected["zeros"].reshape(-1))


def test_quantize_refuses_a_width_that_is_not_whole_blocks():
    from phiedge.errors import BuildError

    with pytest.raises(BuildError, match="does not split into blocks of 128"):
        quantize(np.zeros((4, 96), np.float32), 4, 128, True)


def test_write_makes_an_olive_checkpoint(checkpoints, tmp_path):
    from safetensors import safe_open

    ckpt = Path(checkpoints["phi-4-mini"])
    quant, _ = prequant.write(ckpt, tmp_path / "q", block_size=128, symmetric=True, lm_head_bits=8, embeddings="int8")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == quant
    assert quant["quant_method"] == "olive" and quant["embeds"] and not quant["tie_word_embeddings"]
    assert quant["overrides"] == {"lm_head": {"bits": 8}, "model.embed_tokens": {"bits": 8}}
    tensors = {}
    for path in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:  # numpy has no bfloat16 for the norms copied as they are
            tensors.update((name, f.get_tensor(name)) for name in f.keys())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    # the tied table is quantized twice, at the bits each use was given
    assert tensors["lm_head.qweight"].shape == (vocab, hidden)  # 8 bits: one byte a weight
    assert tensors["model.embed_tokens.qweight"].shape == (vocab, hidden)
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (hidden, config["intermediate_size"] // 2)
    assert not any(name.endswith(".qzeros") for name in tensors)  # symmetric: MatMulNBits' default zero point
    assert not any(name.endswith("proj.weight") or name == prequant.EMBEDDING for name in tensors)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert prequant.count_matrices(ckpt, "int8") == 2 * 4 + 2


def test_write_leaves_the_checkpoints_code_behind(checkpoints, tmp_path):
    """The folder Olive's builder reads holds no Python from the checkpoint and no auto_map naming any."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["phi-4-mini"], ckpt)
    (ckpt / "modeling_evil.py").write_text("raise RuntimeError('imported')\n")
    for name, auto_map in (("config.json", {"AutoModelForCausalLM": "modeling_evil.Phi3ForCausalLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["modeling_evil.Tok", None]})):
        data = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    prequant.write(ckpt, tmp_path / "q", block_size=128, symmetric=True)
    assert list((tmp_path / "q").glob("*.py")) == []
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((tmp_path / "q" / name).read_text())
        assert "auto_map" not in data and data["model_type" if name == "config.json" else "tokenizer_class"]


def matmul_weights(folder: Path) -> dict[str, list[bytes]]:
    """Each MatMulNBits node's weight, scales and zero points, by node (named as either path names it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.name.replace("MatMul_Q4", "MatMulNBits"): [inits[i].reshape(-1).tobytes() for i in node.input[1:] if i]
            for node in model.graph.node if node.op_type == "MatMulNBits"}


@pytest.mark.parametrize("symmetric", [True, False])
def test_stream_build_has_the_builders_int4_weights(checkpoints, tmp_path, symmetric):
    """Same kernel, same weights: the stream method changes how much memory the build takes, not the model."""
    ckpt = checkpoints["phi-4-mini"]
    int4 = {"block_size": 32, "symmetric": symmetric, "embeddings": "float", "lm_head_bits": 4}
    build(ckpt, "cpu", tmp_path / "b", BuildOptions(int4={**int4, "method": "builder"}, validate=False))
    stream = {**int4, "method": "stream", "quantizer": "rtn", "calibrate": False, "eight_bit": []}  # the builder's rounding
    record = build(ckpt, "cpu", tmp_path / "s", BuildOptions(int4=stream, validate=False))
    builder, stream = matmul_weights(tmp_path / "b"), matmul_weights(tmp_path / "s")
    assert len(stream) == 2 * 5 + 1  # fused qkv, o, gate, up, down in each layer, and the LM head
    assert builder == stream
    assert record["int4"]["method"] == "stream"


def test_stream_embedding_table_is_gather_block_quantized(builds):
    import onnx

    built = builds("phi-4-mini", "int4")  # the cpu target: stream, one 8-bit table shared with the LM head
    model = onnx.load(str(built / "model.onnx"), load_external_data=False)
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and "input_ids" in gathers[0].input
    assert {a.name: a.i for a in gathers[0].attribute}["bits"] == 8
    assert not any(t.name == prequant.EMBEDDING for t in model.graph.initializer)  # no float table left
    record = json.loads((built / "phiedge_build.json").read_text())
    assert record["int4"]["embeddings"] == "shared" and record["validation"] is not None


def test_phi2_falls_back_to_the_builder_unless_stream_was_asked_for(checkpoints, tmp_path):
    p = plan(checkpoints["phi-2"], "cpu")
    assert p.int4.method == "builder" and p.int4.embeddings == "float" and not p.streamed
    assert "PhiForCausalLM" in p.notes[0]
    with pytest.raises(ConfigError, match="int4 method stream: PhiForCausalLM"):
        plan(checkpoints["phi-2"], "cpu", BuildOptions(int4={"method": "stream"}))
    assert plan(checkpoints["phi-4-mini"], "cpu").streamed
    config = json.loads((Path(checkpoints["phi-4-mini"]) / "config.json").read_text())
    assert prequant.unsupported(config, checkpoints["phi-4-mini"]) is None
    assert "not in safetensors" in prequant.unsupported(config, tmp_path)  # pytorch_model.bin checkpoints
    assert "already quantized" in prequant.unsupported({**config, "quantization_config": {}}, tmp_path)


def test_stream_refuses_a_recipe_that_quantizes_again(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="recipe cpu-rtn quantizes with Rtn"):
        plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(recipe="cpu-rtn"))
    assert not plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(recipe="cpu-rtn",
                                                                   int4={"method": "builder"})).streamed
    config = plan(checkpoints["phi-4-mini"], "cpu").olive_config(tmp_path)
    assert config["input_model"]["model_path"] == str(tmp_path / "quantized")


def test_builder_settings_switch_a_stream_target_to_the_builder(checkpoints):
    p = plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"algorithm": "k_quant_mixed"}))
    assert (p.int4.method, p.int4.embeddings, p.int4.lm_head_bits) == ("builder", "float", 4)
    assert "algorithm" in p.notes[0]
    p = plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"method": "builder"}))
    assert p.int4.embeddings == "float" and not any("embeddings" in n or "method" in n for n in p.notes)
    with pytest.raises(ConfigError, match="need method: stream"):  # asked for both: say so
        plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"method": "builder", "embeddings": "int4"}))
