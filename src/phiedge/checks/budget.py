"""Will the model fit the device? Weights plus the KV cache at the context cap, against the target's RAM class.

The KV cache is allocated for search.max_length tokens: 2 (key, value) x layers x KV heads x head size x
max_length x bytes per element. At Phi-4-mini's 131072 context in fp32 that is 34 GB, the commonest crash on
phones; at a 4096 cap, 1.07 GB.
"""

from __future__ import annotations

import math

from phiedge.artifacts import ModelFolder
from phiedge.checkpoints.checkpoint import kv_cache_bytes
from phiedge.checks.operators import graphs
from phiedge.schema import Device

ELEMENT_BYTES = {1: 4, 10: 2, 16: 2}  # ONNX elem_type: float, float16, bfloat16


def kv_element_bytes(model) -> int:
    """Bytes per KV cache element, from the graph's past_key_values input type."""
    for value in model.graph.input:
        if value.name.startswith("past_key_values"):
            return ELEMENT_BYTES.get(value.type.tensor_type.elem_type, 4)
    return 4


def estimate(folder: ModelFolder) -> dict:
    """Bytes of the weights on disk and of the KV cache at the folder's max_length."""
    decoder = folder.decoder
    max_length = folder.config["search"]["max_length"]
    weights = sum(p.stat().st_size for p in folder.path.iterdir() if p.name.endswith((".onnx", ".onnx.data", ".bin")))
    kv = kv_cache_bytes(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
                        max_length, kv_element_bytes(folder.graph))  # a pipeline's: its iterator's
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "max_length": max_length, "total_bytes": weights + kv}


def check(usage: dict, device: Device | None, target: str) -> tuple[dict, str | None]:
    """The budget verdict for the record, and a warning sentence with the numbers when it does not fit."""
    if device is None:
        return {**usage, "budget_bytes": None, "fits": None}, None
    budget = int(device.ram_gb * 1e9 * device.budget)
    verdict = {**usage, "budget_bytes": budget, "fits": usage["total_bytes"] <= budget}
    if verdict["fits"]:
        return verdict, None
    gb = 1e9
    return verdict, (f"does not fit the {target} memory budget: weights {usage['weights_bytes'] / gb:.2f} GB + KV "
                     f"cache {usage['kv_cache_bytes'] / gb:.2f} GB at {usage['max_length']} tokens = "
                     f"{usage['total_bytes'] / gb:.2f} GB > {budget / gb:.2f} GB ({device.budget:.0%} of "
                     f"{device.ram_gb:g} GB); lower --context-cap or pick a smaller model")


def weight_accounting(folder: ModelFolder) -> dict:
    """Where the bytes of a model's weights go, and how far the files are from the ideal int4 size.

    Ideal: every MatMulNBits matrix and GatherBlockQuantized table at its bits per weight plus one scale (and
    zero point) per block, every other initializer (a float embedding table, norms, rotary caches) at the
    precision it was written in. The
    external data file should hold exactly that, plus alignment padding.
    """
    model_file = folder.decoder_file
    graph = folder.graph.graph
    sizes = {}
    for init in graph.initializer:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        sizes[init.name] = length if length is not None else len(init.raw_data)
    dims = {init.name: list(init.dims) for init in graph.initializer}
    quantized, ideal, names_q = 0, 0, set()
    # MatMulNBits first: a table the embedding lookup shares with the LM head (its [rows, blocks, blob] weight)
    # is counted once, as the LM head's
    for node in sorted(graph.node, key=lambda n: n.op_type != "MatMulNBits"):
        a = {x.name: x.i for x in node.attribute}
        if node.op_type == "MatMulNBits":
            rows, cols, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in dims and node.input[0] not in names_q:
            bits, block = a.get("bits", 4), a.get("block_size", 128)  # [rows, cols * bits / 8] uint8
            rows, cols = dims[node.input[0]][0], math.prod(dims[node.input[0]][1:]) * 8 // bits
        else:
            continue
        weight_inputs = [name for i, name in enumerate(node.input) if i in (0, 2, 3) and name] \
            if node.op_type == "GatherBlockQuantized" else [name for name in node.input[1:4] if name]
        scale_name = node.input[2]
        blocks = rows * math.ceil(cols / block)
        ideal += rows * cols * bits // 8 + blocks * (sizes.get(scale_name, 0) // max(blocks, 1))
        if len(node.input) > 3 and node.input[3]:
            ideal += math.ceil(blocks * bits / 8)  # zero points, packed
        quantized += sum(sizes.get(name, 0) for name in weight_inputs)
        names_q.update(weight_inputs)
    other = sum(size for name, size in sizes.items() if name not in names_q)
    constants = sum(len(a.t.raw_data) for g in graphs(graph) for n in g.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value")
    files = sum(p.stat().st_size for p in model_file.parent.iterdir() if p.name.startswith(model_file.name))
    data = sum(p.stat().st_size for p in model_file.parent.iterdir() if p.name == model_file.name + ".data")
    return {"quantized_bytes": quantized, "other_bytes": other, "initializer_bytes": quantized + other,
            "ideal_bytes": ideal + other, "data_file_bytes": data, "model_files_bytes": files,
            "graph_constants_bytes": constants,  # e.g. LongRoPE's cos/sin caches, inline in the .onnx file
            "over_ideal": files / (ideal + other) if ideal + other else None}

