"""LoRA inputs in a built decoder graph, and the adapter files onnxruntime-genai loads into them.

For every matrix the build's adapters adapt, the graph gets a float path beside the (int4) MatMul:
y = MatMulNBits(x) + (x @ A) @ B, with A [in, lora_r] and B [lora_r, out] graph inputs named as Olive's
ExtractAdapters / convert-adapters name them. Each input has a default of rank 0 (Olive's optional inputs),
so with no adapter active the path adds zeros and the graph computes the base model; onnxruntime-genai's
`Adapters` feeds an adapter file's tensors to the inputs of the same names. The builder fuses gate_up_proj
into two MatMuls (gate_proj, up_proj); their LoRA path is one, split in two after lora_B.

Only the graph file changes: the defaults are empty, and the weight file is neither read nor written.
"""

from __future__ import annotations

from pathlib import Path

from phiedge.bundle.generate import ADAPTER_SUFFIX
from phiedge.checkpoints.lora import Adapter, onnx_weights
from phiedge.errors import BuildError

RANK = "lora_r"
# PEFT's module -> the builder's node folder(s) under /model/layers.N/
NODES = {"self_attn.qkv_proj": ("attn/qkv_proj",), "self_attn.o_proj": ("attn/o_proj",),
         "mlp.down_proj": ("mlp/down_proj",), "mlp.gate_up_proj": ("mlp/gate_proj", "mlp/up_proj")}
MATMULS = ("MatMulNBits", "MatMul")


def file_name(name: str) -> str:
    """The adapter's file in the model folder (generate.py finds adapters by this suffix)."""
    return name + ADAPTER_SUFFIX


def input_names(matrix: str) -> tuple[str, str]:
    return f"{matrix}.lora_A.weight", f"{matrix}.lora_B.weight"


def _float_type(graph, node) -> int:
    """The element type of the node's float weights (MatMul's B, MatMulNBits' scales): the adapter's too."""
    from onnx import TensorProto

    inits = {i.name: i for i in graph.initializer}
    name = node.input[2] if node.op_type == "MatMulNBits" else node.input[1]
    return inits[name].data_type if name in inits else TensorProto.FLOAT


def add_lora_inputs(onnx_path: Path, adapter: Adapter) -> dict:
    """Add the adapter layout's LoRA paths and inputs to the graph; return {input name: [shape, dtype]} of its
    inputs (rank as `lora_r`). Raises BuildError if a matrix has no MatMul where the builder puts it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    inputs, new_nodes = {}, {}
    for matrix in adapter.matrices:
        layer, module = matrix.split(".")[2], matrix.split(".", 3)[3]
        targets = []
        for folder in NODES[module]:
            node = next((by_name[f"/model/layers.{layer}/{folder}/{op}"] for op in MATMULS
                         if f"/model/layers.{layer}/{folder}/{op}" in by_name), None)
            if node is None:
                raise BuildError(f"the built graph has no MatMul for {matrix} at /model/layers.{layer}/{folder}/: "
                                 "cannot add its LoRA path")
            targets.append(node)
        x = targets[0].input[0]
        dtype = _float_type(graph, targets[0])
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        a_name, b_name = input_names(matrix)
        k, n = _width(graph, targets[0], "in"), _width(graph, targets[0], "out") * len(targets)
        for name, shape in ((a_name, [k, RANK]), (b_name, [RANK, n])):
            graph.input.append(helper.make_tensor_value_info(name, dtype, shape))
            empty = [0 if d == RANK else d for d in shape]
            graph.initializer.append(numpy_helper.from_array(np.zeros(empty, dtype=np_dtype), name))
            inputs[name] = [shape, str(np.dtype(np_dtype))]
        base = f"/model/layers.{layer}/{NODES[module][0].split('/')[0]}/{module.split('.')[1]}/lora"
        nodes = [helper.make_node("MatMul", [x, a_name], [f"{base}_A/output_0"], name=f"{base}_A/MatMul"),
                 helper.make_node("MatMul", [f"{base}_A/output_0", b_name], [f"{base}_B/output_0"],
                                  name=f"{base}_B/MatMul")]
        deltas = [f"{base}_B/output_0"]
        if len(targets) > 1:  # gate_up_proj: lora_B's output is gate's columns, then up's
            split = f"{base}/split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([n // len(targets)] * len(targets),
                                                                      dtype=np.int64), split))
            deltas = [f"{base}/Split/output_{i}" for i in range(len(targets))]
            nodes.append(helper.make_node("Split", [f"{base}_B/output_0", split], deltas, name=f"{base}/Split",
                                          axis=-1))
        for node, delta in zip(targets, deltas):
            out = node.output[0]
            node.output[0] = f"{out}/without_lora"
            nodes.append(helper.make_node("Add", [node.output[0], delta], [out], name=f"{node.name}/lora_Add"))
        new_nodes[targets[-1].name] = nodes
    ordered = []
    for node in graph.node:  # each LoRA path right after the last MatMul it adds to (topological order kept)
        ordered.append(node)
        ordered.extend(new_nodes.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(onnx_path))
    return inputs


def _width(graph, node, side: str) -> int:
    """The MatMul's input (K) or output (N) width, from its weight's shape or MatMulNBits' attributes."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"] if side == "in" else attrs["N"]
    inits = {i.name: i for i in graph.initializer}
    dims = list(inits[node.input[1]].dims)
    return dims[0] if side == "in" else dims[1]


def write_adapter(adapter: Adapter, path: Path, inputs: dict) -> None:
    """The adapter's weights as an ONNX Runtime adapter file (Olive's writer), in the graph inputs' dtype;
    every graph input filled, nothing else."""
    from olive.common.utils import WeightsFileFormat, save_weights

    dtype = next(iter(inputs.values()))[1]
    weights = onnx_weights(adapter, dtype)
    if set(weights) != set(inputs):
        raise BuildError(f"adapter {adapter.name}'s weights {sorted(set(weights) ^ set(inputs))[:2]} do not match "
                         "the graph's LoRA inputs")
    save_weights(weights, path, WeightsFileFormat.ONNX_ADAPTER)  # path ends in .onnx_adapter: kept as given
