"""The built model against the checkpoint carrying the dequantized weights phiedge gave the builder.

With int4 method stream, phiedge quantizes every matrix itself (prequant.write). Quantizing and dequantizing
each weight again, with the settings the build names (bits per tensor, block size, symmetry, quantizer, embedding table
precision), gives the weights the graph must compute with, bit for bit: only kernel arithmetic separates the
built model from this reference (MatMulNBits at accuracy level 4 quantizes its activations to int8 per
block). So the comparison is tight and means something on any checkpoint, random-weight ones included,
where the comparison with the original cannot tell a broken build from quantization error: a damaged data
file, wrong scales, a transposed or misplaced tensor all fail it.

The metric is the relative RMS error of the logits, each position's logits centred (softmax ignores a
shift): ||built - reference|| / ||reference||. It does not depend on how sharp the distributions are.
KL and top-1 are reported beside it, not enforced: KL scales with the spread of the logits, so on random
weights a broken 32-layer build (9e-4) sits below a healthy wide one (7e-4), while the relative error keeps
them 3x apart (benchmarks/RESULTS.md). What a logits comparison cannot see is weights the evaluation never
reaches (rows of tokens absent from the text, rotary rows past its length): bundles carry SHA-256 sums
for that (`phiedge verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from phiedge.checkpoints.fp32 import load_reference
from phiedge.quantize import calibrate
from phiedge.quantize.prequant import (
    EMBEDDING,
    EMBEDDING_BITS,
    LM_HEAD,
    SHARED,
    eight_bit_matrices,
    is_linear,
)
from phiedge.quantize.quantizer import dequantize, quantize
from phiedge.schema import DequantizedSettings, Int4Settings

Logits = Callable[[list[int]], np.ndarray]  # token ids -> the built model's logits at each position, [T, V]
ROWS_PER_CHUNK = 64


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


def bits_of(name: str, int4: Int4Settings) -> int | None:
    """The bits a checkpoint tensor is stored at in a method-stream build (None: kept as it is), as
    prequant.write chooses them."""
    if is_linear(name):
        return 8 if eight_bit_matrices([name], int4.eight_bit)[0] else 4
    if name == LM_HEAD or (name == EMBEDDING and int4.embeddings == SHARED):  # shared: one table at the head's bits
        return int4.lm_head_bits
    if name == EMBEDDING and int4.embeddings != "float":
        return EMBEDDING_BITS[int4.embeddings]
    return None


def importance_of(name: str, int4: Int4Settings, importance: dict | None):
    """The importance prequant.write weighted a checkpoint tensor's search by (None: unweighted)."""
    if not importance:
        return None
    if name == LM_HEAD or (name == EMBEDDING and int4.embeddings == SHARED):
        return importance["lm_head"]
    return importance.get(name[: -len(".weight")]) if is_linear(name) else None


def dequantizer(int4: Int4Settings, importance: dict | None = None):
    """load_reference's transform: each weight as the build stores it, back in fp32."""
    import torch

    def transform(name: str, tensor):
        bits = bits_of(name, int4)
        if bits is None:
            return tensor
        packed, scales, zero_points = quantize(tensor, bits, int4.block_size, int4.symmetric, int4.quantizer,
                                               importance_of(name, int4, importance))
        return torch.from_numpy(dequantize(packed, scales, zero_points, bits, int4.block_size, tuple(tensor.shape)))

    return transform


def load(reference_dir: str | Path, int4: Int4Settings, layerwise: bool | None = None,
         importance: dict | None = None):
    """The checkpoint with the build's dequantized weights, through the reference loader (layer by layer for
    big models: each Linear is quantized and dequantized as its layer is loaded)."""
    return load_reference(reference_dir, layerwise=layerwise, transform=dequantizer(int4, importance))


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


def importance_for(built_dir: str | Path, reference_dir: str | Path, precision: str,
                   int4: Int4Settings | dict | None) -> dict | None:
    """A calibrated build's importance, from its folder (checked against the checkpoint), or None. Read before
    anything is measured, so a missing or damaged file fails at once."""
    if not_applicable(precision, int4) is not None:
        return None
    int4 = int4 if isinstance(int4, Int4Settings) else Int4Settings(**int4)
    return calibrate.load(Path(built_dir) / calibrate.IMPORTANCE, reference_dir) if int4.calibrate else None


def compare(built: Logits, reference_dir: str | Path, precision: str, int4: Int4Settings | dict | None,
            settings: DequantizedSettings, ids: list[int], window: int, importance: dict | None = None) -> dict:
    """The dequantized check's report: its metrics, thresholds and failures, always enforced; or why it
    does not apply to this build. `importance`: a calibrated build's (importance_for)."""
    why = not_applicable(precision, int4)
    if why is not None:
        return {"applies": False, "why": why, "failures": [], "passed": None}
    int4 = int4 if isinstance(int4, Int4Settings) else Int4Settings(**int4)
    values = metrics(load(reference_dir, int4, importance=importance), built, ids[:settings.eval_tokens], window)
    failures = check(values, settings)
    return {"applies": True, "metrics": values, "thresholds": settings.maxima(), "failures": failures,
            "passed": not failures}


def summary_line(report: dict) -> str:
    if not report["applies"]:
        return f"dequant    not applicable: {report['why']}"
    m, limits = report["metrics"], report["thresholds"]
    return (f"dequant    logits relative RMS {m['logits_rel_rms']:.3g} (max {limits['logits_rel_rms']}), "
            f"KL mean {m['kl_mean']:.3g}, top-1 {m['top1']:.4f} over {m['positions']} positions, against the "
            "checkpoint with the build's dequantized weights")
