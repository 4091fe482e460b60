"""Faults a broken int4 build has, injected into a built folder: validation must catch each of them.

Each function edits the folder in place and writes new files (a shared export's data file is a hard link:
it must not be changed under the other folder). Used by the tests and by benchmarks/dequant_check.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = "model.onnx.data"


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _own(folder: Path) -> None:
    """A private copy of a hard-linked data file (onnx also refuses to load one)."""
    path = Path(folder) / DATA
    if path.stat().st_nlink > 1:
        _rewrite(path, path.read_bytes())


def overwrite_data(folder: Path, nbytes: int = 1 << 16, at: float = 0.5, seed: int = 0) -> str:
    """Random bytes over a stretch of the weights file (a truncated download, a bad disk, a bad copy)."""
    path = Path(folder) / DATA
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    stop = min(len(raw), start + nbytes)
    raw[start:stop] = np.random.default_rng(seed).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    _rewrite(path, bytes(raw))
    return f"{stop - start} bytes overwritten at {start} of {len(raw)}: {', '.join(stored_in(folder, start, stop))}"


def stored_in(folder: Path, start: int, stop: int) -> list[str]:
    """The initializers whose bytes in the data file overlap [start, stop)."""
    import onnx

    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    names = []
    for t in model.graph.initializer:
        where = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        if where and where["offset"] < stop and where["offset"] + where["length"] > start:
            names.append(t.name)
    return names


def _edit(folder: Path, change) -> str:
    """Load the graph with its weights, let `change` edit the arrays by name, save it back the way the builder
    wrote it (one external data file)."""
    import onnx
    from onnx import numpy_helper

    folder = Path(folder)
    _own(folder)
    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    changed = change(arrays)
    for name in changed:
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[name]), name))
    (folder / "model.onnx").unlink()
    (folder / DATA).unlink()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    return ", ".join(changed)


def matmul(name: str) -> str:
    """The initializer prefix of a MatMulNBits node, e.g. matmul("layers.0.attn.o_proj")."""
    return name if name.startswith("lm_head") else f"model.{name}.MatMulNBits"


def scale(folder: Path, node: str = "layers.0.attn.o_proj", factor: float = 2.0) -> str:
    """One MatMulNBits' scales multiplied (a scale written for another block size or dtype)."""
    def change(a):
        a[f"{matmul(node)}.scales"] = a[f"{matmul(node)}.scales"] * np.float32(factor)
        return [f"{matmul(node)}.scales"]
    return _edit(folder, change)


def swap_rows(folder: Path, node: str = "layers.0.attn.o_proj") -> str:
    """The two halves of one weight's rows (output channels) exchanged, scales with them (rows written in
    the wrong order: a chunking or fusing bug)."""
    def change(a):
        names = [f"{matmul(node)}.qweight", f"{matmul(node)}.scales"]
        for name in names:
            half = a[name].shape[0] // 2
            a[name] = np.concatenate([a[name][half:], a[name][:half]])
        return names
    return _edit(folder, change)


def transpose(folder: Path, node: str = "layers.0.attn.o_proj", block: int = 128) -> str:
    """A square weight stored transposed (quantized along the wrong axis), requantized so the layout is
    well-formed: the bug of handing the kernel W instead of W.T."""
    from phiedge.quantize.quantizer import dequantize, quantize

    def change(a):
        q, s = f"{matmul(node)}.qweight", f"{matmul(node)}.scales"
        n = a[q].shape[0]
        w = dequantize(a[q].reshape(n, -1), a[s].reshape(n, -1), None, 4, block, (n, n))
        packed, scales, _ = quantize(np.ascontiguousarray(w.T), 4, block, True)
        a[q], a[s] = packed.reshape(a[q].shape), scales.reshape(a[s].shape)
        return [q, s]
    return _edit(folder, change)


def swap_tensors(folder: Path, first: str = "layers.0.attn.o_proj", second: str = "layers.1.attn.o_proj") -> str:
    """Two same-shaped weights exchanged (a name mix-up when writing the quantized checkpoint)."""
    def change(a):
        names = []
        for part in ("qweight", "scales"):
            x, y = f"{matmul(first)}.{part}", f"{matmul(second)}.{part}"
            a[x], a[y] = a[y], a[x]
            names += [x, y]
        return names
    return _edit(folder, change)


def rewire(folder: Path, first: str = "layers.0.attn.o_proj", second: str = "layers.1.attn.o_proj") -> str:
    """Two same-shaped MatMulNBits nodes reading each other's weights, every initializer intact (a graph wired
    wrongly: the weights' digests hold, the logits must not)."""
    import onnx

    folder = Path(folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    names = {f"{matmul(n)}.{part}": f"{matmul(m)}.{part}" for n, m in ((first, second), (second, first))
             for part in ("qweight", "scales")}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.input[:] = [names.get(i, i) for i in node.input]
    (folder / "model.onnx").unlink()
    onnx.save_model(model, str(folder / "model.onnx"))  # the data file stays where the initializers say
    return f"{first} <-> {second}"


def norm(folder: Path, name: str = "model.layers.0.input_layernorm.weight", factor: float = 3.0) -> str:
    """One norm's weight multiplied: a float tensor phiedge did not quantize, so no digest covers it."""
    def change(a):
        a[name] = a[name] * np.float32(factor)
        return [name]
    return _edit(folder, change)


FAULTS = {
    "damaged data file (64 KiB overwritten mid-file)": overwrite_data,
    "wrong scales (layers.0 o_proj scales x2)": scale,
    "swapped rows (layers.0 o_proj halves)": swap_rows,
    "transposed weight (layers.0 o_proj)": transpose,
    "swapped tensors (layers.0 and layers.1 o_proj)": swap_tensors,
    "rewired graph (layers.0 and layers.1 o_proj read each other's weights)": rewire,
    "wrong norm (layers.0 input_layernorm x3)": norm,
}
