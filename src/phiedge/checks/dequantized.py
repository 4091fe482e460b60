"""The built model against the checkpoint carrying the dequantized weights phiedge gave the builder.

With int4 method stream, phiedge quantizes every matrix itself (prequant.write) and records each one's SHA-256
(artifacts.WEIGHTS). This check reads every quantized matrix back from the graph's initializers, holds it to
that digest, and dequantizes it into the checkpoint: the reference is then exactly what the graph must
compute, and only kernel arithmetic separates the built model from it (MatMulNBits at accuracy level 4
quantizes its activations to int8 per block). So the comparison is tight and means something on any
checkpoint, random-weight ones included, where the comparison with the original cannot tell a broken build
from quantization error. A damaged data file, wrong scales, a transposed or misplaced tensor change a digest
(`weights_sha256`, naming the matrices); what changes the graph around intact weights (a rewired input, a
damaged norm or rotary cache that the text reaches) changes the logits (`logits_rel_rms`).

The logits metric is the relative RMS error of the logits, each position's logits centred (softmax ignores a
shift): ||built - reference|| / ||reference||. It does not depend on how sharp the distributions are.
KL and top-1 are reported beside it, not enforced: KL scales with the spread of the logits, so on random
weights a broken 32-layer build (9e-4) sits below a healthy wide one (7e-4), while the relative error keeps
them 3x apart (benchmarks/RESULTS.md). What a logits comparison cannot see is weights the evaluation never
reaches (rows of tokens absent from the text, rotary rows past its length): the digests cover every quantized
byte, and bundles carry SHA-256 sums of every file (`phiedge verify`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from phiedge.artifacts import WEIGHTS, ModelFolder, WeightDigests, read
from phiedge.checkpoints.fp32 import load_reference
from phiedge.errors import ModelError
from phiedge.quantize import split_table
from phiedge.quantize.prequant import EMBEDDING, LM_HEAD
from phiedge.quantize.quantizer import dequantize, digest
from phiedge.schema import DequantizedSettings, Int4Settings

Logits = Callable[[list[int]], np.ndarray]  # token ids -> the built model's logits at each position, [T, V]
ROWS_PER_CHUNK = 64
# The builder's initializer names for the matrices phiedge quantized, and the checkpoint's name of each: a layer's
# attention projections under attn (self_attn in the checkpoint), a fused gate_up_proj split into gate and up.
LAYER_MATRIX = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMulNBits\.qweight$")
SPLIT = {"gate_up_proj": ("gate_proj", "up_proj")}
TABLE = EMBEDDING[: -len(".weight")]
HEAD = LM_HEAD[: -len(".weight")]
SPLIT_PARTS = {f"{part}.MatMulNBits.qweight": part for part in split_table.BITS}  # graph_fixes.split_tied_table's


def not_applicable(precision: str, int4: Int4Settings | dict | None) -> str | None:
    """Why the dequantized check does not apply to a build with these settings, or None when it does."""
    if precision != "int4":
        return f"{precision} has no quantized weights: the comparison with the original is exact already"
    if int4 is None:
        return "the build record does not say how the weights were quantized"
    method = int4["method"] if isinstance(int4, dict) else int4.method
    if method != "stream":
        return (f"int4 method {method}: the builder quantized the graph itself, so phiedge cannot re-create "
                "the weights it wrote")
    return None


class GraphWeights:
    """The quantized matrices in a built graph, by checkpoint name (without .weight): for each, the initializers
    holding its rows (one, or a split matrix's parts in row order) with their bits and block size."""

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        graph = folder.graph.graph
        self.initializers = {init.name: init for init in graph.initializer}
        parts: dict[str, dict] = {}
        head_weights = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
        for node in graph.node:
            if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
                continue
            attrs = {a.name: a.i for a in node.attribute}
            inputs = list(node.input)
            # MatMulNBits(A, B, scales, zero points), GatherBlockQuantized(data, indices, scales, zero points)
            weight = inputs[1] if node.op_type == "MatMulNBits" else inputs[0]
            if node.op_type == "GatherBlockQuantized" and weight in head_weights:
                continue  # a shared or split table: the LM head's own tensors
            zeros = inputs[3] if len(inputs) > 3 and inputs[3] else None
            name = self.checkpoint_name(weight)
            if name is not None:
                parts[weight] = {"name": name, "tensors": (weight, inputs[2], zeros), "bits": attrs.get("bits", 4),
                                 "block": attrs["block_size"]}
        self.matrices: dict[str, list[dict]] = {}
        for weight in sorted(parts, key=lambda w: self._order(w)):
            self.matrices.setdefault(parts[weight]["name"], []).append(parts[weight])

    @staticmethod
    def checkpoint_name(weight: str) -> str | None:
        if weight == f"{HEAD}.MatMulNBits.qweight":
            return HEAD
        if weight in SPLIT_PARTS:
            return SPLIT_PARTS[weight]
        if weight == f"{TABLE}.qweight":
            return TABLE
        m = LAYER_MATRIX.match(weight)
        if m is None:
            return None
        layer, block, proj = m.groups()
        fused = next((whole for whole, split in SPLIT.items() if proj in split), proj)
        return f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}.{fused}"

    @staticmethod
    def _order(weight: str):
        m = LAYER_MATRIX.match(weight)
        proj = m.group(3) if m else ""
        split = next((s for s in SPLIT.values() if proj in s), ())
        return (GraphWeights.checkpoint_name(weight) or "", split.index(proj) if proj in split else 0)

    def _array(self, name: str | None):
        """An initializer's array, external data read from the file it names inside the folder (by hand: onnx's
        own reader refuses a data file with several hard links, which a reused export's is)."""
        if name is None:
            return None
        from onnx import helper, numpy_helper

        if name not in self.initializers:
            raise ModelError(f"{self.folder.decoder_file} has no initializer {name}")
        init = self.initializers[name]
        where = {e.key: e.value for e in init.external_data}
        if not where:
            return numpy_helper.to_array(init)
        root = self.folder.path.resolve()
        path = (root / where.get("location", "")).resolve()
        if root not in path.parents:
            raise ModelError(f"{name}'s external data {where.get('location')!r} is not a file inside {root}")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        offset = int(where.get("offset", 0))
        data = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if data.size != count:
            raise ModelError(f"{path.name} ends inside {name} (offset {offset}, {count} values of {dtype})")
        return data.reshape(tuple(init.dims))

    def arrays(self, matrix: str):
        """(packed [N, K * bits / 8], scales [N, blocks], zero points or None, bits, block size) of a matrix,
        its parts' rows concatenated, as prequant.write produced them."""
        parts = self.matrices[matrix]
        got = [[self._array(t) for t in part["tensors"]] for part in parts]
        packed = np.concatenate([g[0].reshape(g[0].shape[0], -1) for g in got])
        scales = np.concatenate([g[1].reshape(g[1].shape[0], -1) for g in got])
        zeros = None if got[0][2] is None else np.concatenate([g[2].reshape(g[2].shape[0], -1) for g in got])
        return packed, scales, zeros, parts[0]["bits"], parts[0]["block"]

    def digest(self, matrix: str) -> str:
        packed, scales, zeros, _, _ = self.arrays(matrix)
        return digest(packed, scales.astype(np.float32), zeros)

    def weight(self, matrix: str, shape) -> np.ndarray:
        packed, scales, zeros, bits, block = self.arrays(matrix)
        return dequantize(packed, scales, zeros, bits, block, tuple(shape))

    def split(self) -> bool:
        return split_table.HOT in self.matrices

    def positions_digest(self) -> str:
        return split_table.positions_digest(self._array(split_table.POSITIONS))

    def split_table(self, shape) -> np.ndarray:
        """The split table (split_table) back in token order, in fp32."""
        parts = {split_table.POSITIONS: self._array(split_table.POSITIONS)}
        for part in split_table.BITS:
            packed, scales, _, _, block = self.arrays(part)
            parts.update({f"{part}.packed": packed, f"{part}.scales": scales})
        return split_table.table(parts, block, tuple(shape))


def digests_of(folder: ModelFolder) -> WeightDigests:
    path = folder.path / WEIGHTS
    if not path.is_file():
        raise ModelError(f"{folder.path} has no {WEIGHTS} (the digests of the weights phiedge quantized): "
                         "rebuild it with this phiedge")
    return read(WeightDigests, path, ModelError)


def mismatched(graph: GraphWeights, recorded: WeightDigests) -> list[str]:
    """The recorded matrices whose weights in the graph are missing or differ from what phiedge quantized."""
    shared = TABLE in recorded.matrices and TABLE not in graph.matrices  # the table is the LM head's tensors
    wrong = []
    for matrix, expected in recorded.matrices.items():
        source = HEAD if matrix == TABLE and shared else matrix
        if matrix == split_table.POSITIONS:
            if not graph.split() or graph.positions_digest() != expected:
                wrong.append(matrix)
        elif source not in graph.matrices or graph.digest(source) != expected:
            wrong.append(matrix)
    unrecorded = set(graph.matrices) - set(recorded.matrices) - ({HEAD} if shared else set())
    return wrong + sorted(unrecorded)


def dequantizer(graph: GraphWeights, recorded: WeightDigests):
    """load_reference's transform: each quantized weight as the graph stores it, back in fp32."""
    import torch

    shared = TABLE in recorded.matrices and TABLE not in graph.matrices

    def transform(name: str, tensor):
        matrix = name[: -len(".weight")]
        if matrix in (TABLE, HEAD) and graph.split():
            return torch.from_numpy(graph.split_table(tuple(tensor.shape)))
        if matrix == TABLE and shared:
            matrix = HEAD
        if matrix not in graph.matrices:
            return tensor
        return torch.from_numpy(graph.weight(matrix, tuple(tensor.shape)))

    return transform


def load(reference_dir: str | Path, graph: GraphWeights, recorded: WeightDigests, layerwise: bool | None = None,
         adapter: Path | None = None):
    """The checkpoint with the graph's dequantized weights, through the reference loader (layer by layer for
    big models: each matrix is read from the graph and dequantized as its layer is loaded), with the adapter if any."""
    return load_reference(reference_dir, layerwise=layerwise, transform=dequantizer(graph, recorded), adapter=adapter)


def metrics(reference, built: Logits, ids: list[int], window: int) -> dict:
    """Relative RMS error of the centred logits over every position, and KL(reference || built), in float64
    ROWS_PER_CHUNK positions at a time (a 200k vocabulary)."""
    import torch

    err = norm = 0.0
    kl, top1, n = [], 0, 0
    for start in range(0, len(ids), window):
        inputs = ids[start:start + window]
        with torch.no_grad():
            ref_window = reference(torch.tensor([inputs])).logits[0]
        out_window = torch.from_numpy(np.asarray(built(inputs)))
        vocab = min(ref_window.shape[-1], out_window.shape[-1])
        for row in range(0, len(inputs), ROWS_PER_CHUNK):
            ref = ref_window[row:row + ROWS_PER_CHUNK, :vocab].double()
            out = out_window[row:row + ROWS_PER_CHUNK, :vocab].double()
            ref_c, out_c = ref - ref.mean(-1, keepdim=True), out - out.mean(-1, keepdim=True)
            err += float(((out_c - ref_c) ** 2).sum())
            norm += float((ref_c ** 2).sum())
            lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
            kl.extend((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).tolist())
            top1 += int((ref.argmax(-1) == out.argmax(-1)).sum())
        n += len(inputs)
    return {"positions": n, "logits_rel_rms": (err / norm) ** 0.5, "kl_mean": float(np.mean(kl)),
            "kl_max": float(np.max(kl)), "top1": top1 / n}


def check(values: dict, settings: DequantizedSettings) -> list[str]:
    failures = []
    for name, limit in settings.maxima().items():
        if limit is not None and values[name] > limit:
            failures.append(f"{name} {values[name]:.4g} against the dequantized reference exceeds the maximum "
                            f"{limit:.4g} ({values[name] / limit:.2g}x)")
    return failures


def compare(built: Logits, folder: ModelFolder, reference_dir: str | Path, precision: str,
            int4: Int4Settings | dict | None, settings: DequantizedSettings, ids: list[int], window: int,
            adapter_dir: Path | None = None) -> dict:
    """The dequantized check's report: the weights' digests, then its metrics, thresholds and failures, always
    enforced; or why it does not apply to this build. With `adapter_dir` (a PEFT folder), the reference is the
    dequantized checkpoint with that adapter applied by PEFT, and `built` runs with it active."""
    why = not_applicable(precision, int4)
    if why is not None:
        return {"applies": False, "why": why, "failures": [], "passed": None}
    recorded = digests_of(folder)
    graph = GraphWeights(folder)
    wrong = mismatched(graph, recorded)
    digests = {"matrices": len(recorded.matrices), "mismatched": wrong}
    if wrong:
        failure = (f"weights_sha256: {len(wrong)} of {len(recorded.matrices)} quantized matrices in the graph are "
                   f"missing or differ from what phiedge quantized ({', '.join(wrong[:3])}"
                   f"{', ...' if len(wrong) > 3 else ''})")
        return {"applies": True, "digests": digests, "metrics": None, "thresholds": settings.maxima(),
                "failures": [failure], "passed": False}
    reference = load(reference_dir, graph, recorded, adapter=adapter_dir)
    values = metrics(reference, built, ids[:settings.eval_tokens], window)
    failures = check(values, settings)
    return {"applies": True, "digests": digests, "metrics": values, "thresholds": settings.maxima(),
            "failures": failures, "passed": not failures}


def summary_line(report: dict) -> str:
    if not report["applies"]:
        return f"dequant    not applicable: {report['why']}"
    if report["metrics"] is None:
        return f"dequant    {report['failures'][0]}"
    m, limits = report["metrics"], report["thresholds"]
    return (f"dequant    logits relative RMS {m['logits_rel_rms']:.3g} (max {limits['logits_rel_rms']}), "
            f"KL mean {m['kl_mean']:.3g}, top-1 {m['top1']:.4f} over {m['positions']} positions, against the "
            "checkpoint with the build's dequantized weights")
