"""The NPU stage of a `snapdragon-npu` build: what Olive's static QDQ graphs still need before the Qualcomm HTP runs
them right, then their compilation into QNN context binaries.

Olive's passes (recipes/qnn.yaml) write an embeddings model, a context model (a window of prompt tokens), an
iterator (one token) and an LM head. Three things are left to phiedge, each measured on the HTP simulator
(benchmarks/RESULTS.md, "Snapdragon NPU"):

- StaticLLM fixes batch and window but leaves the KV cache's length symbolic; the HTP's GroupQueryAttention then
  fails with "Cannot get shape". The KV length becomes the context cap.
- Phi-4-mini rotates 96 of each head's 128 dimensions (partial rotary). GroupQueryAttention takes that from a
  rotary cache narrower than half the head; the CPU provider computes it right, QNN's HTP does not (KL 0.25 against
  transformers where the CPU provider gives 2e-3). `full_rotary` rewrites the graph so the rotary covers the whole
  head and computes the same function: the query and key rows of each head are permuted so that each rotated pair
  sits half a head apart and the unrotated dimensions pair with each other, and the caches are padded with cos 1,
  sin 0 (a rotation by zero). Attention scores are dot products of query and key, which one permutation of both
  leaves unchanged; values and outputs are untouched.
- Olive 0.13 will not run its context-binary pass on Linux, so ONNX Runtime's ModelCompiler compiles each decoder
  model here with CPU fallback off: a node the HTP cannot take fails the build, so a written context binary means
  every decoder node runs on the HTP. The embeddings lookup and the LM head stay on the CPU, as in Olive's QNN recipes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from phiedge.errors import BuildError
from phiedge.schema import NpuSettings

KV_DIM = "past_sequence_length"  # StaticLLM's symbolic KV length
DECODER_STAGES = ("context", "iterator")  # the pipeline stages that run on the HTP
AFFINITY = {"op_type": {"GroupQueryAttention": "htp"}}  # QNN keeps GQA off the HTP unless asked
CONTEXT_SUFFIX = "_ctx.onnx"  # ONNX Runtime's name for a model whose graph is one EPContext node
INSTALL = "pip install onnxruntime-qnn==2.7.0"


def qnn():
    """onnxruntime-qnn: the QNN provider library and its HTP backend (the simulator on x86-64)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise BuildError(f"the QNN execution provider is not installed: {INSTALL}") from None
    return onnxruntime_qnn


def register_with_onnxruntime():
    """ONNX Runtime's QNN devices, the provider library registered once per process."""
    import onnxruntime as ort

    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        ort.register_execution_provider_library("QNNExecutionProvider", qnn().get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    return devices


def provider_options(npu: NpuSettings) -> dict[str, str]:
    """What genai_config.json asks of the QNN provider: the HTP backend by type (its library is the installed
    provider's own, never a path from the model folder) and the chip the context binaries were compiled for."""
    return {"backend_type": "htp", "htp_arch": str(npu.htp_arch), "soc_model": str(npu.soc_model)}


def head_permutation(head: int, half: int) -> np.ndarray:
    """New order of one head's dimensions so that a full rotary (pairs j, j + head/2) computes a partial one
    (pairs i, i + half for i < half; dimensions from 2 x half on left alone): the rotated halves go to the start
    of each half head, the unrotated dimensions after them."""
    rotary, rest = 2 * half, head - 2 * half
    return np.concatenate([np.arange(half), np.arange(rotary, rotary + rest // 2),
                           np.arange(half, rotary), np.arange(rotary + rest // 2, head)])


def full_rotary(model) -> int:
    """Rewrite each GroupQueryAttention whose rotary cache covers part of the head (see the module docstring);
    return how many were rewritten. The model's weights must be loaded."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    value_shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    done, count = set(), 0
    widths = {}  # each rotary cache's width as written, before the first attention that reads it pads it
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 9 or not node.input[7]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        half = widths.setdefault(node.input[7], numpy_helper.to_array(inits[node.input[7]]).shape[1])
        head = value_shapes[node.input[3]][-1]  # past key: [batch, kv heads, length, head size]
        if 2 * half == head:
            continue
        if node.input[1] or attrs.get("do_rotary") != 1 or attrs.get("rotary_interleaved", 0):
            raise BuildError(f"{node.name}: expected packed QKV with a non-interleaved rotary inside the attention")
        heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
        perm = head_permutation(head, half)
        columns = np.arange((heads + 2 * kv_heads) * head)
        for h in range(heads + kv_heads):  # query heads, then key heads; values keep their order
            columns[h * head:(h + 1) * head] = h * head + perm
        weights = qkv_weights(node, producer)
        for name in weights:
            if name in done:
                continue
            tensor = numpy_helper.to_array(inits[name])
            if tensor.ndim == 0:  # one scale or zero point for the whole matrix: nothing to move
                continue
            if tensor.shape[-1] != len(columns):
                raise BuildError(f"{node.name}: {name} is {list(tensor.shape)}, not [..., {len(columns)}] columns")
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(tensor[..., columns]), name))
            done.add(name)
        for index, rotation_by_zero in ((7, 1.0), (8, 0.0)):  # cos 1, sin 0 for the unrotated pairs
            name = node.input[index]
            if name not in done:
                table = numpy_helper.to_array(inits[name])
                pad = np.full((table.shape[0], head // 2 - half), rotation_by_zero, table.dtype)
                inits[name].CopyFrom(numpy_helper.from_array(np.concatenate([table, pad], axis=1), name))
                done.add(name)
        count += 1
    return count


def qkv_weights(attention, producer: dict) -> list[str]:
    """The initializers that hold the fused QKV projection's columns (int4 weight, scales, zero points), found
    upstream of the attention's packed input: its activation QDQ pair, the MatMul, the weight's DequantizeLinear."""
    node = producer.get(attention.input[0])
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise BuildError(f"{attention.name}: its packed QKV input does not come from a MatMul")
    weight = producer.get(node.input[1])
    if weight is None or weight.op_type != "DequantizeLinear":
        raise BuildError(f"{attention.name}: the QKV MatMul's weight is not a DequantizeLinear of int4 weights")
    return [name for name in weight.input if name]


def external_files(model) -> set[str]:
    """The data files a model's external tensors live in."""
    import onnx

    return {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def fix_static(model_dir: Path, names: list[str], kv_length: int) -> int:
    """Fix the KV length and make the rotary full in each decoder model; each is saved with a data file of its
    own (Olive's iterator reads the context model's), and the data files they read before are removed. Returns how
    many attention nodes were rewritten."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    headers = {name: onnx.load(str(model_dir / name), load_external_data=False) for name in names}
    old = {name for model in headers.values() for name in external_files(model)} | set(names)
    for name in old:  # onnx refuses data files that are hard links (olive.collect links Olive's)
        path = model_dir / name
        if path.is_file() and path.stat().st_nlink > 1:
            shutil.copyfile(path, path.with_name(path.name + ".copy"))
            os.replace(path.with_name(path.name + ".copy"), path)
    models = {name: onnx.load(str(model_dir / name)) for name in names}  # all read before any data file changes
    rewritten = 0
    for model in models.values():
        make_dim_param_fixed(model.graph, KV_DIM, kv_length)  # the KV inputs' shapes: what full_rotary reads
        rewritten += full_rotary(model)
    for name in old:
        (model_dir / name).unlink(missing_ok=True)
    for name, model in models.items():
        onnx.save(model, str(model_dir / name), save_as_external_data=True, location=f"{name}.data")
    return rewritten


def compile_context_binary(model_dir: Path, name: str, npu: NpuSettings) -> list[str]:
    """Compile one decoder model for the HTP with CPU fallback off (ONNX Runtime's ModelCompiler); return the files
    written: the EPContext model and its QNN binary, named after the model."""
    import onnxruntime as ort

    devices = register_with_onnxruntime()
    affinity = model_dir / ".qnn_affinity.json"
    affinity.write_text(json.dumps(AFFINITY))
    target = model_dir / (Path(name).stem + CONTEXT_SUFFIX)
    before = set(os.listdir(model_dir))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(devices, {**provider_options(npu), "op_affinity": str(affinity)})
    try:
        ort.ModelCompiler(options, str(model_dir / name), embed_compiled_data_into_model=False,
                          flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED).compile_to_file(str(target))
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidArgument for every compile failure
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{name} does not run entirely on the QNN HTP (CPU fallback off): {first}") from None
    finally:
        affinity.unlink(missing_ok=True)
    return sorted(set(os.listdir(model_dir)) - before - {affinity.name})
