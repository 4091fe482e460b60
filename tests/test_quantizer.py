"""quantizer: the mse search never loses to round-to-nearest, and what it writes is what ONNX Runtime computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phiedge.errors import BuildError
from phiedge.quantize import quantizer

EPS32 = float(np.finfo(np.float32).eps)
KINDS = ("normal", "laplace", "student2", "uniform", "outlier", "constant", "zeros", "sparse", "on_grid", "tiny")


def make_rows(kind: str, rng: np.random.Generator, rows: int, k: int, block: int) -> np.ndarray:
    """Rows of one kind of weights: smooth, heavy-tailed, degenerate, or already on a quantization grid."""
    if kind == "normal":
        w = rng.standard_normal((rows, k))
    elif kind == "laplace":
        w = rng.laplace(size=(rows, k))
    elif kind == "student2":
        w = rng.standard_t(2, (rows, k))
    elif kind == "uniform":
        w = rng.uniform(-1, 1, (rows, k))
    elif kind == "outlier":  # one large weight in each block, as LLM matrices have
        w = rng.standard_normal((rows, k))
        w[:, rng.integers(0, block)::block] *= rng.uniform(5, 50)
    elif kind == "constant":
        w = np.full((rows, k), rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 3))
    elif kind == "zeros":
        w = np.zeros((rows, k))
    elif kind == "sparse":
        w = rng.standard_normal((rows, k)) * (rng.random((rows, k)) < 0.1)
    elif kind == "on_grid":  # the dequantized weights of some other 4-bit quantization
        w = rng.integers(-8, 8, (rows, k)) * np.repeat(rng.uniform(0.01, 0.1, (rows, k // block)), block, axis=1)
    else:
        w = rng.standard_normal((rows, k)) * 1e-30
    return w.astype(np.float32) * np.float32(rng.choice([1e-3, 0.02, 1.0, 100.0]))


@st.composite
def cases(draw):
    bits = draw(st.sampled_from([4, 8]))
    block = draw(st.sampled_from([16, 32, 128]))
    symmetric = draw(st.booleans())
    blocks = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    weighted = draw(st.booleans())
    rng = np.random.default_rng(seed)
    k = block * blocks
    w = np.concatenate([make_rows(kind, rng, int(rng.integers(1, 4)), k, block) for kind in kinds])
    importance = None
    if weighted:  # an importance with zeros and a wide range, like inputs' mean squares
        importance = (rng.random(k) ** 4 * (rng.random(k) > 0.2)).astype(np.float32)
    return bits, block, symmetric, w, importance


def errors(w, bits, block, symmetric, method, importance=None, weights=None):
    packed, scales, zeros = quantizer.quantize(w, bits, block, symmetric, method, importance=importance)
    approx = quantizer.dequantize(packed, scales, zeros, bits, block, w.shape)
    return quantizer.block_error(w, approx, block, weights)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_search_error_is_never_above_round_to_nearest(case):
    """Every block, every distribution: the weighted squared error of mse <= that of ONNX Runtime's RTN
    (same bits, block, and the search's weights, importance included). The slack is the float32 rounding of
    a block's sum of squares (at most block * eps relative), which the search's own comparison is subject to."""
    bits, block, symmetric, w, importance = case
    weights = quantizer.search_weights(w, block, importance)
    rtn = errors(w, bits, block, symmetric, "rtn", weights=weights)
    mse = errors(w, bits, block, symmetric, "mse", importance, weights=weights)
    assert np.all(mse <= rtn * (1 + 2 * block * EPS32)), (mse - rtn).max()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits, block, at_most", [(4, 32, 0.95), (4, 128, 0.96), (8, 32, 0.85)])
def test_search_lowers_the_error(bits, block, symmetric, at_most):
    """Never worse is not enough: on LLM-like weights the search must actually find better scales."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, (64, 1024)) * 0.02).astype(np.float32)
    weights = quantizer.search_weights(w, block)
    rtn = errors(w, bits, block, symmetric, "rtn", weights=weights).sum()
    assert errors(w, bits, block, symmetric, "mse", weights=weights).sum() < at_most * rtn


def test_importance_weights_the_search():
    """Columns that matter more are fitted better: the weighted error falls below the unweighted search's."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    importance = np.where(np.arange(256) % 4 == 0, 100.0, 0.01).astype(np.float32)
    weights = quantizer.search_weights(w, 32, importance)
    plain = errors(w, 4, 32, True, "mse", weights=weights).sum()
    weighted = errors(w, 4, 32, True, "mse", importance, weights=weights).sum()
    assert weighted < 0.9 * plain


def test_chunks_do_not_change_the_result():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    whole = quantizer.quantize(w, 4, 32, False, "mse")
    for part, full in zip(quantizer.quantize(w, 4, 32, False, "mse", rows=7), whole):
        assert np.array_equal(part, full)


def test_bad_arguments_are_refused():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(BuildError, match="not one of rtn, mse"):
        quantizer.quantize(w, 4, 32, True, "gptq")
    with pytest.raises(BuildError, match="4 or 8 bits"):
        quantizer.quantize(w, 3, 32, True)
    with pytest.raises(BuildError, match="64 finite non-negative"):
        quantizer.quantize(w, 4, 32, True, "mse", importance=-np.ones(64))
    with pytest.raises(BuildError, match="rtn has nothing to weight"):
        quantizer.quantize(w, 4, 32, True, "rtn", importance=np.ones(64))


def run_ort(nodes, inputs: dict, initializers: dict, output: str, out_dtype) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, types[v.dtype], v.shape) for n, v in inputs.items()],
        [helper.make_tensor_value_info(output, out_dtype, None)],
        [numpy_helper.from_array(v, n) for n, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], inputs)[0]


LAYOUTS = [(bits, symmetric, method) for bits in (4, 8) for symmetric in (True, False) for method in quantizer.METHODS]


@pytest.mark.parametrize("bits, symmetric, method", LAYOUTS)
def test_matmulnbits_computes_with_the_dequantized_weight(bits, symmetric, method):
    """The arrays as the builder's quantized-checkpoint reader hands them to MatMulNBits (qweight [N, blocks,
    blob], scales [N, blocks], qzeros as written): x @ dequantize(W).T to float32 rounding. Three blocks a row
    make the 4-bit zero points end on a half-filled byte."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    n, k, block = 24, 96, 32
    w = (rng.standard_t(4, (n, k)) * 0.05 + 0.01).astype(np.float32)
    packed, scales, zeros = quantizer.quantize(w, bits, block, symmetric, method)
    reference = quantizer.dequantize(packed, scales, zeros, bits, block, w.shape)
    x = rng.standard_normal((5, k)).astype(np.float32)
    inits = {"w": packed.reshape(n, k // block, -1), "s": scales}
    if zeros is not None:
        inits["z"] = zeros
    node = helper.make_node("MatMulNBits", ["x", *inits], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    y = run_ort([node], {"x": x}, inits, "y", TensorProto.FLOAT)
    expected = x.astype(np.float64) @ reference.T.astype(np.float64)
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert (zeros is None) == symmetric


@pytest.mark.parametrize("bits, symmetric, method", LAYOUTS)
def test_gather_block_quantized_returns_the_dequantized_rows(bits, symmetric, method):
    """The embedding table as Olive's patched builder wires it: qweight [vocab, hidden * bits / 8], scales
    [vocab, blocks], qzeros as written, attributes bits and block_size."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    vocab, hidden, block = 40, 96, 32
    table = (rng.standard_normal((vocab, hidden)) * 0.1).astype(np.float32)
    packed, scales, zeros = quantizer.quantize(table, bits, block, symmetric, method)
    reference = quantizer.dequantize(packed, scales, zeros, bits, block, table.shape)
    ids = np.array([[0, 7, 39, 7, 12]], dtype=np.int64)
    inits = {"w": packed, "s": scales}
    if zeros is not None:
        inits["z"] = zeros
    node = helper.make_node("GatherBlockQuantized", ["w", "ids", "s", *(["z"] if zeros is not None else [])],
                            ["y"], domain="com.microsoft", bits=bits, block_size=block)
    y = run_ort([node], {"ids": ids}, inits, "y", TensorProto.FLOAT)
    assert np.allclose(y[0], reference[ids[0]], rtol=1e-6, atol=0)


def test_stream_build_writes_the_searched_weights_and_the_eight_bit_policy(checkpoints, tmp_path):
    """The build's MatMulNBits weights are the quantizer's mse output for the checkpoint's matrices, at 8 bits
    where eight_bit names them and 4 elsewhere; the model validates (loads and runs) like any build."""
    import onnx
    from onnx import numpy_helper
    from safetensors import safe_open

    from phiedge.build.plan import BuildOptions
    from phiedge.build.stages import build

    ckpt = Path(checkpoints["phi-4-mini"])
    int4 = {"quantizer": "mse", "eight_bit": ["model.layers.0.mlp.down_proj"], "calibrate": False,
            "embeddings": "int8", "lm_head_bits": 4}  # unweighted search; the only 8-bit matrix the one named
    record = build(ckpt, "cpu", tmp_path / "m", BuildOptions(int4=int4))
    assert record["int4"]["quantizer"] == "mse" and record["int4"]["eight_bit"] == int4["eight_bit"]
    assert record["validation"] is not None
    assert json.loads((tmp_path / "m" / "phiedge_build.json").read_text())["int4"]["quantizer"] == "mse"
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    block = record["int4"]["block_size"]
    with safe_open(str(next(ckpt.glob("*.safetensors"))), framework="pt") as f:
        for layer, bits in ((0, 8), (1, 4)):
            weight = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight")
            node = next(n for name, n in nodes.items() if f"layers.{layer}/" in name and "down_proj" in name)
            assert {a.name: a.i for a in node.attribute}["bits"] == bits
            packed, scales, _ = quantizer.quantize(weight, bits, block, True, "mse")
            assert np.array_equal(inits[node.input[1]].reshape(-1), packed.reshape(-1))
            assert np.array_equal(inits[node.input[2]].reshape(-1), scales.reshape(-1))
            assert not np.array_equal(quantizer.quantize(weight, bits, block, True, "rtn")[0], packed)
    assert sum({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nodes.values()) == 1


def test_quantizer_option_is_checked_at_the_cli(runner, checkpoints, tmp_path):
    from phiedge.cli import cli

    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-4-mini"], "-o",
                                 str(tmp_path / "o"), "--quantizer", "mse", "--int4-method", "builder"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "quantizer mse" in lines[0] \
        and "need method: stream" in lines[0]
    assert not (tmp_path / "o").exists()
    line = [ln for ln in runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-4-mini"], "-o",
                                            str(tmp_path / "o"), "--eight-bit", "model.layers.*.mlp.down_proj",
                                            "--eight-bit", "model.layers.9.*"]).output.splitlines() if ln.strip()]
    assert len(line) == 1 and "eight_bit pattern 'model.layers.9.*' matches no layer matrix" in line[0]
    assert not (tmp_path / "o").exists()
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-2"], "-o",
                                 str(tmp_path / "o"), "--quantizer", "mse"])
    assert result.exit_code != 0 and "int4 method stream: PhiForCausalLM" in result.output
    assert "Traceback" not in result.output


def test_phone_targets_build_with_the_cpu_policy(builds):
    """android and ios build with the cpu target's GPTQ policy (ORT's ARM kernels take its block); on the tests'
    384-wide checkpoint the plan falls back to the largest block that divides it, and says so. (The trained model's
    android build, which test_package's bundle test makes too.)"""
    from phiedge import catalog

    record = json.loads((builds("trained", "int4", "android") / "phiedge_build.json").read_text())
    int4 = record["int4"]
    assert (int4["quantizer"], int4["calibrate"], int4["block_size"]) == ("gptq", True, 128)
    assert any("block_size 256 does not divide" in note for note in record["notes"])
    assert record["calibration"]["tokens"] > 0 and record["validation"]["dequantized"]["passed"]
    cpu = catalog.find_target("cpu").int4
    assert all(catalog.find_target(t).int4 == cpu for t in ("ios", "android"))
