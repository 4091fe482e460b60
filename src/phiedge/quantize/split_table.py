"""One tied table at two precisions (`eight_bit_rows`): the rows of the most probable tokens at 8 bits, the rest
at 4.

A token's row of the LM head moves the logits only where the model gives that token probability: to second
order, KL(reference || quantized) is half the variance under the reference's distribution p of the logits'
errors, so row v's error counts in proportion to p_v. Token probabilities are Zipfian, and a small share of
the rows carries most of the probability mass (and, as the same table serves the embedding lookup, most of
the tokens looked up). Keeping those rows at 8 bits and the rest at 4 costs little more than one 4-bit table,
which decode reads whole at every token, and keeps most of an 8-bit table's closeness: ONNX Runtime has no
6-bit MatMulNBits for llama.cpp's Q6_K output layer, so this is the way between 4 and 8 bits with its kernels.

The calibration (calibrate.Calibration with row_probability) gives each row's mean probability; the rows are
ranked by it. Layout: the hot rows (ascending token id) then the cold ones, each part a MatMulNBits weight of
its own; `positions[v]` is token v's row in that concatenation, which the graph uses to put the logits back in
token order and to look a token's embedding up in its part (graph_fixes.split_tied_table). Quantized here a
slice of the checkpoint's rows at a time, symmetric, each part by the mse search weighted by the LM head's
input importance; written beside the build (FILE) until the graph takes it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from phiedge.errors import BuildError
from phiedge.quantize import gptq
from phiedge.quantize.quantizer import ROWS_PER_CHUNK, as_fp32, dequantize, digest, quantize

HOT, COLD = "lm_head.hot", "lm_head.cold"  # the parts' names, as matrices (digests) and graph initializers
POSITIONS = "lm_head.positions"
ROW_PROBABILITY = "lm_head.mean_probability"  # the calibration's importance key: each row's mean output probability
FILE = "phiedge_split_table.safetensors"
BITS = {HOT: 8, COLD: 4}


def hot_rows(probability: np.ndarray, share: float) -> np.ndarray:
    """The token ids of the round(share x vocabulary) most probable rows (at least one, never all), ascending."""
    vocab = probability.shape[0]
    count = min(vocab - 1, max(1, round(share * vocab)))
    order = np.argsort(-np.asarray(probability, dtype=np.float64), kind="stable")
    return np.sort(order[:count])


def positions_of(hot: np.ndarray, vocab: int) -> np.ndarray:
    """Each token's row in [hot rows; cold rows] (int64, what the graph gathers with)."""
    is_hot = np.zeros(vocab, dtype=bool)
    is_hot[hot] = True
    order = np.concatenate([np.flatnonzero(is_hot), np.flatnonzero(~is_hot)])
    positions = np.empty(vocab, dtype=np.int64)
    positions[order] = np.arange(vocab)
    return positions


def quantize_split(rows, hot: np.ndarray, block_size: int, importance=None,
                   cold_moments=None) -> dict[str, np.ndarray]:
    """The [V, K] table (any row-sliceable array or tensor) as {HOT/COLD + .packed/.scales, POSITIONS}, a slice of
    rows at a time: the hot rows by the mse search, the cold ones too or, given the LM head's input second
    moments, by GPTQ (which makes the LM head's output closer at some cost to the looked-up rows)."""
    vocab, k = rows.shape
    is_hot = np.zeros(vocab, dtype=bool)
    is_hot[hot] = True
    positions = positions_of(hot, vocab)
    count = {HOT: int(is_hot.sum()), COLD: int(vocab - is_hot.sum())}
    out = {f"{part}.packed": np.empty((count[part], k * BITS[part] // 8), np.uint8) for part in (HOT, COLD)}
    out.update({f"{part}.scales": np.empty((count[part], k // block_size), np.float32) for part in (HOT, COLD)})
    factor = None if cold_moments is None else gptq.inverse_factor(cold_moments, gptq.DAMP)
    for start in range(0, vocab, ROWS_PER_CHUNK):
        chunk = as_fp32(rows[start:min(vocab, start + ROWS_PER_CHUNK)])
        where = positions[start:start + chunk.shape[0]]
        mask = is_hot[start:start + chunk.shape[0]]
        for part, select, offset in ((HOT, mask, 0), (COLD, ~mask, count[HOT])):
            if not select.any():
                continue
            if part == COLD and factor is not None:
                packed, scales, _ = gptq.quantize(chunk[select], cold_moments, BITS[part], block_size, True,
                                                  factor=factor)
            else:
                packed, scales, _ = quantize(chunk[select], BITS[part], block_size, True, "mse", importance)
            at = where[select] - offset
            out[f"{part}.packed"][at], out[f"{part}.scales"][at] = packed, scales
    out[POSITIONS] = positions
    return out


def digests(parts: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each part as MatMulNBits reads it (quantizer.digest's bytes) and of the positions."""
    found = {part: digest(parts[f"{part}.packed"], parts[f"{part}.scales"], None) for part in (HOT, COLD)}
    found[POSITIONS] = positions_digest(parts[POSITIONS])
    return found


def positions_digest(positions) -> str:
    return hashlib.sha256(np.ascontiguousarray(positions, dtype=np.int64).tobytes()).hexdigest()


def table(parts: dict[str, np.ndarray], block_size: int, shape) -> np.ndarray:
    """The fp32 [V, K] table the two parts hold, rows back in token order."""
    vocab, k = shape
    positions = np.asarray(parts[POSITIONS]).reshape(-1)
    if sorted(positions.tolist()) != list(range(vocab)):
        raise BuildError(f"the split table's positions are not a permutation of its {vocab} rows")
    both = np.concatenate([dequantize(parts[f"{part}.packed"], parts[f"{part}.scales"], None, BITS[part], block_size,
                                      (parts[f"{part}.scales"].shape[0], k)) for part in (HOT, COLD)])
    return both[positions]


def save(path, parts: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(array) for name, array in parts.items()}, str(path))


def load(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
