"""The snapdragon-npu target: Olive's static QDQ graphs, fixed for the QNN HTP and compiled to context binaries,
validated against transformers on the HTP simulator that onnxruntime-qnn carries (x86-64 Linux)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import once
from onnx import TensorProto, helper, numpy_helper

from phiedge.build import npu
from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.bundle.generate import generate, load
from phiedge.bundle.package import package
from phiedge.bundle.verify import verify
from phiedge.checks.greedy import PROMPTS, common_prefix
from phiedge.cli import cli
from phiedge.errors import ConfigError, ValidationFailed

CAP = 128  # the KV length of the test builds: the simulator attends over all of it at every step


@pytest.fixture(scope="module")
def npu_build(trained, tmp_path_factory):
    return once(tmp_path_factory, "builds/trained-int4-snapdragon-npu",
                lambda out: build(trained, "snapdragon-npu", out, BuildOptions(context_cap=CAP)))


def attention_graph(head=128, half=48, heads=3, kv_heads=1, hidden=64, length=16, seed=0):
    """x -> DequantizeLinear(int8 weight) -> MatMul -> GroupQueryAttention (packed QKV, partial rotary caches), as
    the builder and Olive's QDQ passes write it, on random data."""
    rng = np.random.default_rng(seed)
    columns = (heads + 2 * kv_heads) * head
    weight = rng.integers(-127, 128, (hidden, columns), dtype=np.int8)
    angles = np.arange(64)[:, None] * (1.0 / 10000 ** (np.arange(half) / half))[None, :]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_dq"]),
             helper.make_node("MatMul", ["x", "w_dq"], ["qkv"]),
             helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k",
                                                      "total_sequence_length", "cos", "sin"],
                              ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                              kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)]
    past = [1, kv_heads, length, head]
    graph = helper.make_graph(nodes, "attention", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, length, hidden]),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, past),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, past),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    inputs = {"x": rng.standard_normal((1, length, hidden)).astype(np.float32),
              "past_key": np.zeros(past, np.float32), "past_value": np.zeros(past, np.float32),
              "seqlens_k": np.array([length - 1], np.int32), "total_sequence_length": np.array(length, np.int32)}
    return onnx.shape_inference.infer_shapes(model), inputs


def run(model, inputs):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], inputs)[0]


def test_a_full_head_rotary_computes_the_partial_one():
    """The rewrite QNN's HTP needs is exact on the CPU provider; padding the caches without moving the rows (the
    fault it guards against) is not."""
    model, inputs = attention_graph()
    want = run(model, inputs)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert npu.full_rotary(rewritten) == 1
    caches = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert caches["cos"].shape == caches["sin"].shape == (64, 64)
    assert (caches["cos"][:, 48:] == 1).all() and (caches["sin"][:, 48:] == 0).all()
    np.testing.assert_allclose(run(rewritten, inputs), want, rtol=1e-4, atol=1e-4)  # summation order only
    padded_only = onnx.ModelProto()
    padded_only.CopyFrom(rewritten)
    for t in padded_only.graph.initializer:
        if t.name == "w":
            t.CopyFrom(next(u for u in model.graph.initializer if u.name == "w"))
    assert np.abs(run(padded_only, inputs) - want).max() > 0.1
    assert npu.full_rotary(rewritten) == 0  # a full rotary is left as it is


def test_the_head_permutation_pairs_rotated_halves_and_leaves_the_rest():
    perm = npu.head_permutation(128, 48)
    assert sorted(perm) == list(range(128))
    pairs = {(int(perm[j]), int(perm[j + 64])) for j in range(64)}
    assert {(i, i + 48) for i in range(48)} <= pairs  # every rotated pair half a head apart
    assert all(a >= 96 and b >= 96 for a, b in pairs - {(i, i + 48) for i in range(48)})


def test_the_build_runs_every_decoder_node_on_the_htp_and_validates(npu_build):
    record = json.loads((npu_build / "phiedge_build.json").read_text())
    assert record["execution_provider"] == "qnn" and record["versions"]["onnxruntime-qnn"] == "2.7.0"
    runtime = record["runtime"]
    assert runtime["max_length"] == CAP and runtime["npu"]["kv_length"] == CAP
    assert runtime["npu"]["full_rotary_nodes"] == 4  # two layers, in the context and the iterator model
    assert runtime["npu"]["context_binaries"] == ["context_ctx.onnx", "iterator_ctx.onnx"]
    graph = record["checks"]["graph"]
    assert graph["provider"] == "QNNExecutionProvider" and graph["models"] == ["context.onnx", "iterator.onnx"]
    assert graph["operators"]["com.microsoft::GroupQueryAttention"] == 4
    files = set(record["files"])
    assert {"context_ctx.onnx", "iterator_ctx.onnx", "embeddings.onnx", "lm_head.onnx"} <= files
    assert not {"context.onnx", "iterator.onnx", "context.onnx.data"} & files  # the QDQ graphs are compiled away
    for name in ("context_ctx.onnx", "iterator_ctx.onnx"):
        ops = {n.op_type for n in onnx.load(str(npu_build / name), load_external_data=False).graph.node}
        assert ops == {"EPContext"}
    config = json.loads((npu_build / "genai_config.json").read_text())
    stages = {k: v for entry in config["model"]["decoder"]["pipeline"] for k, v in entry.items()}
    assert stages["context"]["session_options"]["provider_options"] == [
        {"qnn": {"backend_type": "htp", "htp_arch": "73", "soc_model": "60"}}]
    assert "session_options" not in stages["embeddings"] and "session_options" not in stages["lm_head"]
    v = record["validation"]
    assert v["passed"] is True and v["enforced"] is True and v["kl_mean"] < 1e-2 and v["top1"] > 0.9, v


def test_greedy_tokens_agree_with_the_cpu_int4_build(npu_build, builds, trained):
    """The NPU build (uint16 activations on the simulator) and the cpu target's int4 build of the same checkpoint
    start their greedy replies alike."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained)
    models = {name: load(str(path))[0] for name, path in
              (("npu", npu_build), ("cpu", builds("trained", "int4")))}
    agree = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        replies = {name: list(generate(m, ids, 16)) for name, m in models.items()}
        agree.append(common_prefix(replies["npu"], replies["cpu"]))
    assert sum(agree) >= 12, agree  # of 48


def test_a_graph_without_the_rotary_rewrite_fails_validation(trained, tmp_path, monkeypatch):
    """The injected fault: QNN's HTP computing Phi-4-mini's partial rotary itself. The cpu target's int4 thresholds
    catch it (KL 0.25 against transformers here, against 3e-3 with the rewrite)."""
    monkeypatch.setattr(npu, "full_rotary", lambda model: 0)
    with pytest.raises(ValidationFailed, match="kl_mean"):
        build(trained, "snapdragon-npu", tmp_path / "out", BuildOptions(context_cap=CAP))
    assert not (tmp_path / "out").exists()


def test_a_context_cap_within_the_window_is_refused(trained, tmp_path, runner):
    result = runner.invoke(cli, ["build", "--target", "snapdragon-npu", "--model", trained, "-o", str(tmp_path / "o"),
                                 "--context-cap", "64"])
    assert result.exit_code != 0 and "context cap 64 must exceed the NPU's prompt window (64 tokens)" in result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError):
        build(trained, "snapdragon-npu", tmp_path / "o", BuildOptions(context_cap=32))


def test_the_bundle_verifies_and_runs_on_the_simulator(npu_build, tmp_path, runner):
    archive = tmp_path / "npu.zip"
    manifest = package(npu_build, archive)
    assert manifest["layout"] == "windows-npu" and manifest["execution_provider"] == "qnn"
    name = manifest["name"]
    assert {f"model/{f}" for f in ("context_ctx.onnx", "iterator_ctx.onnx")} <= set(manifest["files"])
    assert "run.ps1" in manifest["files"]
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        requirements = zf.read(f"{name}/requirements.txt").decode()
    assert requirements == "onnxruntime-genai>=0.14.1\nonnxruntime-qnn>=2.7.0\n"
    checked = verify(archive)
    assert checked["ok"] and checked["loaded"] is True
    result = runner.invoke(cli, ["run", str(archive), "--prompt", "def main():", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
