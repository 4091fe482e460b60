"""Corrections to what the model builder writes, where it is measurably wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from phiedge.errors import BuildError
from phiedge.quantize import split_table

NORM_OPS = {"LayerNormalization", "SkipLayerNormalization"}


def layernorm_epsilon(onnx_path: Path, hf_config: dict) -> int:
    """Set LayerNorm epsilon to the checkpoint's `layer_norm_eps`; return how many nodes changed.

    The builder reads only `rms_norm_eps` and falls back to 1e-6, so Phi-2 (layer_norm_eps 1e-5)
    gets fp32 logits off by up to 0.02 and greedy tokens that drift from transformers'.
    Only the graph's attributes change; the external weight file is untouched.
    """
    import onnx

    eps = hf_config.get("layer_norm_eps")
    if eps is None or "rms_norm_eps" in hf_config:
        return 0
    model = onnx.load(str(onnx_path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type in NORM_OPS:
            for attr in node.attribute:
                if attr.name == "epsilon" and abs(attr.f - eps) > 1e-12:
                    attr.f = float(eps)
                    changed += 1
    if changed:
        onnx.save(model, str(onnx_path))
    return changed


COPY_CHUNK = 64 << 20  # bytes copied at a time when the external data file is rewritten
INLINE_BYTES = 1024  # initializers added below this size stay in the graph file


def share_tied_table(onnx_path: Path) -> int:
    """Serve the embedding lookup from the LM head's quantized table and drop the table's own copy; return
    the bytes the external data file lost.

    A tied checkpoint quantized once (prequant's `embeddings: shared`) still reaches the file twice: the
    builder writes the same tensors as the GatherBlockQuantized table and as the LM head's MatMulNBits
    weight. The LM head keeps its [vocab, blocks, blob] weight as an initializer, which ONNX Runtime needs
    to prepack it (without prepacking a decode step is ~100x slower); GatherBlockQuantized takes uint8 data
    of any rank quantized along its last axis, so it reads that same weight with one block per last-axis
    row (quantize_axis 2, scales reshaped to [vocab, blocks, 1]) and its [.., blocks, block] rows are
    reshaped to [.., hidden]. The other way round, a Reshape of the weight into the Gather's
    [vocab, hidden * bits / 8], costs a whole copy: ONNX Runtime folds it into a new buffer at load.
    Both copies are compared byte for byte first, so nothing that is not one table gets shared.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather, head = _table_nodes(graph, inits)
    g_attrs = {a.name: helper.get_attribute_value(a) for a in gather.attribute}
    h_attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    g_in, h_in = [*gather.input, ""], [*head.input, "", ""]
    table, scales, zeros = inits.get(g_in[0]), inits.get(g_in[2]), inits.get(g_in[3])
    weight, head_scales, head_zeros = inits.get(h_in[1]), inits.get(h_in[2]), inits.get(h_in[3])
    if scales is None or weight is None or head_scales is None:
        raise BuildError("the embedding table or the LM head is not stored as initializers: nothing to share")
    bits, block = h_attrs["bits"], h_attrs["block_size"]
    if (zeros is not None or head_zeros is not None) and bits != 8:
        raise BuildError(f"a shared {bits}-bit table must be symmetric: GatherBlockQuantized reads the LM head's "
                         "packed zero points only at 8 bits")
    vocab, blocks, blob = weight.dims if len(weight.dims) == 3 else (0, 0, 0)
    pairs = [(table, weight), (scales, head_scales)] + ([(zeros, head_zeros)] if zeros is not None else [])
    if (g_attrs.get("bits", 4), g_attrs.get("block_size", 128), g_attrs.get("gather_axis", 0)) != (bits, block, 0) \
            or list(table.dims) != [vocab, blocks * blob] or (zeros is None) != (head_zeros is None) \
            or not all(a.data_type == b.data_type and _bytes_equal(onnx_path.parent, a, b) for a, b in pairs):
        raise BuildError("the embedding table and the LM head differ (bits, block size, shape or bytes): "
                         "they cannot be one table")
    dropped = {t.name for t, _ in pairs}
    if any(name in dropped for n in graph.node if n is not gather for name in n.input):
        raise BuildError("the embedding table is used by more than the embedding lookup: it cannot be dropped")
    prefix = "/model/embed_tokens/shared"
    shapes = [helper.make_node("Constant", [], [f"{prefix}/{name}"], name=f"{prefix}/{name}",
                               value=numpy_helper.from_array(np.array(dims, np.int64)))
              for name, dims in (("block_shape", [vocab, blocks, 1]), ("row_shape", [0, 0, -1]))]
    before = [*shapes, *(helper.make_node("Reshape", [src.name, shapes[0].output[0]], [f"{prefix}/{what}"],
                                          name=f"{prefix}/{what}")
                         for what, src in (("scales", head_scales), ("zero_points", head_zeros)) if src is not None)]
    rows = f"{prefix}/rows"
    after = helper.make_node("Reshape", [rows, shapes[1].output[0]], [gather.output[0]], name=f"{prefix}/reshape")
    gather.input[:] = [weight.name, gather.input[1], *(n.output[0] for n in before[len(shapes):])]
    gather.output[0] = rows
    del gather.attribute[:]
    gather.attribute.extend([helper.make_attribute("bits", bits), helper.make_attribute("block_size", block),
                             helper.make_attribute("gather_axis", 0), helper.make_attribute("quantize_axis", 2)])
    nodes = list(graph.node)
    at = nodes.index(gather)
    del graph.node[:]
    graph.node.extend([*nodes[:at], *before, gather, after, *nodes[at + 1:]])
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return _rewrite_external_data(model, onnx_path)


def _table_nodes(graph, inits):
    """The embedding's GatherBlockQuantized and the LM head's MatMulNBits."""
    gather = next((n for n in graph.node if n.op_type == "GatherBlockQuantized" and n.input[0] in inits), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")), None)
    if gather is None or head is None:
        raise BuildError("the shared table needs a GatherBlockQuantized embedding and a MatMulNBits LM head; "
                         f"the graph has {'no embedding lookup' if gather is None else 'no quantized LM head'}")
    return gather, head


def split_tied_table(onnx_path: Path, split_file: Path) -> int:
    """Put prequant's split table (split_table: the most probable tokens' rows at 8 bits, the rest at 4) in
    place of the one table the builder wrote twice; return the bytes the external data file lost.

    The LM head becomes one MatMulNBits per part, their logits concatenated ([hot; cold] row order) and gathered
    back into token order by the positions; the embedding looks a token's row up in its part (two
    GatherBlockQuantized, as share_tied_table reads a MatMulNBits weight, on the indices the positions give,
    and a Where by part). Every tensor is read by the LM head's kernels, so nothing is stored twice.
    """
    import onnx
    from onnx import helper, numpy_helper

    parts = split_table.load(split_file)
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather, head = _table_nodes(graph, inits)
    h_attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, hidden, block = h_attrs["N"], h_attrs["K"], h_attrs["block_size"]
    positions = parts[split_table.POSITIONS]
    if len(head.input) > 3 and any(head.input[3:]) or len(gather.input) > 3 and any(gather.input[3:]):
        raise BuildError("the split table is symmetric: the builder's LM head or table has zero points or a bias")
    if positions.shape != (vocab,) or sum(parts[f"{p}.packed"].shape[0] for p in split_table.BITS) != vocab \
            or any(parts[f"{p}.scales"].shape[1:] != (hidden // block,) for p in split_table.BITS):
        raise BuildError(f"{split_file.name} does not fit the graph's LM head ({vocab} x {hidden}, block {block})")
    dropped = {gather.input[0], gather.input[2], head.input[1], head.input[2]}
    if any(name in dropped for n in graph.node if n is not gather and n is not head for name in n.input):
        raise BuildError("the builder's table is used by more than the embedding lookup and the LM head")
    hot = parts[f"{split_table.HOT}.packed"].shape[0]
    added = [numpy_helper.from_array(positions.astype(np.int64), split_table.POSITIONS)]
    rows, logits = [], []
    for part, bits in split_table.BITS.items():
        count = parts[f"{part}.packed"].shape[0]
        weight = f"{part}.MatMulNBits.qweight"
        scales = f"{part}.MatMulNBits.scales"
        added += [numpy_helper.from_array(parts[f"{part}.packed"].reshape(count, hidden // block, -1), weight),
                  numpy_helper.from_array(parts[f"{part}.scales"], scales)]
        logits.append(helper.make_node(
            "MatMulNBits", [head.input[0], weight, scales], [f"/{part}/logits"], name=f"/{part}/MatMulNBits",
            domain="com.microsoft", K=hidden, N=count, bits=bits, block_size=block,
            accuracy_level=h_attrs.get("accuracy_level", 0)))
        rows.append((part, weight, scales, bits, count))
    prefix = "/model/embed_tokens/split"

    def const(name: str, value) -> str:
        added.append(numpy_helper.from_array(np.array(value, np.int64), f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    ids = gather.input[1]
    nodes = [helper.make_node("Gather", [split_table.POSITIONS, ids], [f"{prefix}/position"],
                              name=f"{prefix}/position"),
             helper.make_node("Less", [f"{prefix}/position", const("hot", hot)], [f"{prefix}/is_hot"],
                              name=f"{prefix}/is_hot"),
             helper.make_node("Min", [f"{prefix}/position", const("last_hot", hot - 1)], [f"{prefix}/hot_index"],
                              name=f"{prefix}/hot_index"),
             helper.make_node("Sub", [f"{prefix}/position", f"{prefix}/hot"], [f"{prefix}/past_hot"],
                              name=f"{prefix}/past_hot"),
             helper.make_node("Max", [f"{prefix}/past_hot", const("zero", 0)], [f"{prefix}/cold_index"],
                              name=f"{prefix}/cold_index"),
             helper.make_node("Unsqueeze", [f"{prefix}/is_hot", const("last_axis", [-1])], [f"{prefix}/choose"],
                              name=f"{prefix}/choose")]
    row_shape = const("row_shape", [0, 0, -1])
    for (part, weight, scales, bits, count), index in zip(rows, ("hot_index", "cold_index")):
        nodes += [helper.make_node("Reshape", [scales, const(f"{part}_block_shape", [count, hidden // block, 1])],
                                   [f"{prefix}/{part}/scales"], name=f"{prefix}/{part}/scales"),
                  helper.make_node("GatherBlockQuantized", [weight, f"{prefix}/{index}", f"{prefix}/{part}/scales"],
                                   [f"{prefix}/{part}/blocks"], name=f"{prefix}/{part}/gather",
                                   domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=2),
                  helper.make_node("Reshape", [f"{prefix}/{part}/blocks", row_shape],
                                   [f"{prefix}/{part}/rows"], name=f"{prefix}/{part}/rows")]
    nodes.append(helper.make_node("Where", [f"{prefix}/choose", f"{prefix}/{split_table.HOT}/rows",
                                            f"{prefix}/{split_table.COLD}/rows"], [gather.output[0]],
                                  name=f"{prefix}/where"))
    head_nodes = [*logits,
                  helper.make_node("Concat", [n.output[0] for n in logits], ["/lm_head/split/logits"],
                                   name="/lm_head/split/concat", axis=-1),
                  helper.make_node("Gather", ["/lm_head/split/logits", split_table.POSITIONS], [head.output[0]],
                                   name="/lm_head/split/order", axis=-1)]
    replaced = []
    for node in graph.node:
        replaced += nodes if node is gather else head_nodes if node is head else [node]
    del graph.node[:]
    graph.node.extend(replaced)
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return _rewrite_external_data(model, onnx_path, added)


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _bytes_equal(folder: Path, a, b) -> bool:
    """Whether two external tensors hold the same bytes, read a chunk at a time."""
    ia, ib = _external(a), _external(b)
    if not ia or not ib or int(ia["length"]) != int(ib["length"]):
        return False
    length = int(ia["length"])
    with open(folder / ia["location"], "rb") as fa, open(folder / ib["location"], "rb") as fb:
        fa.seek(int(ia.get("offset", 0)))
        fb.seek(int(ib.get("offset", 0)))
        while length > 0:
            n = min(COPY_CHUNK, length)
            if fa.read(n) != fb.read(n):
                return False
            length -= n
    return True


def _rewrite_external_data(model, onnx_path: Path, added=()) -> int:
    """Write the external data again with only the tensors the graph still has, packed in the order they had
    (a chunk at a time: memory stays flat at any model size), then the `added` initializers after them, then the
    graph (those under INLINE_BYTES in the graph itself); return the bytes saved."""
    import onnx

    folder = onnx_path.parent
    external = sorted(((int(_external(t).get("offset", 0)), t) for t in model.graph.initializer
                       if t.data_location == onnx.TensorProto.EXTERNAL), key=lambda pair: pair[0])
    locations = {_external(t)["location"] for _, t in external}
    if len(locations) != 1:
        raise BuildError(f"{onnx_path.name} keeps its weights in {len(locations)} files; expected one")
    data = folder / locations.pop()
    before = data.stat().st_size
    staged = data.with_name(data.name + ".tmp")
    with open(data, "rb") as src, open(staged, "wb") as dst:
        for offset, tensor in external:
            length = int(_external(tensor)["length"])
            info = {**_external(tensor), "offset": str(dst.tell())}
            del tensor.external_data[:]
            for key, value in info.items():
                tensor.external_data.add(key=key, value=value)
            src.seek(offset)
            while length > 0:
                chunk = src.read(min(COPY_CHUNK, length))
                if not chunk:
                    raise BuildError(f"{data.name} ends before {tensor.name}'s bytes")
                dst.write(chunk)
                length -= len(chunk)
        for tensor in added:
            if len(tensor.raw_data) < INLINE_BYTES:  # shapes stay in the graph, where shape inference reads them
                model.graph.initializer.append(tensor)
                continue
            info = {**_external(external[0][1]), "offset": str(dst.tell()), "length": str(len(tensor.raw_data))}
            dst.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in info.items():
                tensor.external_data.add(key=key, value=value)
            model.graph.initializer.append(tensor)
    staged_graph = onnx_path.with_name(onnx_path.name + ".tmp")
    onnx.save(model, str(staged_graph))
    os.replace(staged, data)
    os.replace(staged_graph, onnx_path)
    return before - data.stat().st_size
