"""Block quantization of a [N, K] weight into what ONNX Runtime's MatMulNBits and GatherBlockQuantized read.

The layout (ONNX Runtime's contrib operators; the builder's quantized-checkpoint reader passes it through):
packed [N, K * bits / 8] uint8, blocks of `block_size` along K, at 4 bits element 2i in the low nibble of byte
i and 2i+1 in the high one; scales [N, K / block] float32; zero points [N, ceil(blocks * bits / 8)] uint8,
packed like the weights (block 2j low nibble), or absent for symmetric, when the kernels use 2^(bits-1).
A weight is (q - zero_point) * scale, q in 0 .. 2^bits - 1.

Two ways to choose each block's scale and zero point:
- rtn: ONNX Runtime's own kernel (`quantize_matmul_4bits`/`_8bits`, the builder's default int4 path): round
  to nearest, the block's signed absolute maximum mapped to -2^(bits-1) (symmetric) or its range [min(w, 0),
  max(w, 0)] to 0 .. 2^bits - 1 (asymmetric).
- mse: the scale (and zero point) of least weighted squared error (`search_weights`), llama.cpp's search
  (`make_qx_quants`, `make_qkx2_quants`): round at a grid of candidate scales around round-to-nearest's,
  refit each candidate's scale to its integers by least squares, keep the best, refine around it, round once
  more at the refit scale. Each block then keeps round-to-nearest's own parameters unless the search's error
  is lower, so its error is never above rtn's.

Why phiedge's own search rather than one of ONNX Runtime's (checked in onnxruntime 1.32):
- `HQQWeightOnlyQuantizer` minimizes an L^0.7 proximal objective (not squared error, no weights), asymmetric
  only, in torch over whole initializers, and keeps its result even when it is worse than round-to-nearest.
- The k-quant path (`onnxruntime.quantization.neural_compressor.weight_only.quant_tensor_k_quant_cpu`, what the
  builder's k_quant algorithms run; ONNX Runtime carries it, Intel's neural_compressor is not installed) is
  asymmetric only and weighs by |w| + rms(block), with no way to pass an importance. It searches a real-valued
  minimum, then rounds the zero point and re-rounds every weight with it, which discards the error it searched
  for; and it works on a whole tensor in float64.
Neither takes symmetric blocks (every phiedge target) or an importance, so they could not serve calibration
either. The search here is numpy on one slice of rows at a time, vectorized across that slice's blocks.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from phiedge.errors import BuildError

METHODS = ("rtn", "mse")
ROWS_PER_CHUNK = 4096  # rows read at once: Phi-4's 17920-wide down_proj is 294 MB of fp32
SEARCH_ELEMENTS = 1 << 18  # weights searched together: the working arrays stay in the core's cache
# Candidate divisors of the block's extreme, as multiples of round-to-nearest's (2^(bits-1), or 2^bits - 1
# asymmetric), then the best one's neighbours at half the step. Over 1 the extreme is clipped to refine the
# rest (llama.cpp tries 0.89 .. 1.11 of it in 19 steps at 4 bits). The best multiples found on Student-t
# blocks (5th to 95th percentile) lie in 0.83 .. 1.05 at 4 bits and block 16, 1.00 .. 1.23 at block 128, and
# 0.83 .. 1.00 at 8 bits (where the rounding, not the extreme, dominates the error).
COARSE = {4: tuple(1 + i / 16 for i in range(-3, 7) if i), 8: tuple(1 - i / 64 for i in range(1, 10))}
FINE = {4: 1 / 32, 8: 1 / 128}


def quantize(weight_rows, bits: int, block_size: int, symmetric: bool, method: str = "rtn",
             importance=None, rows: int = ROWS_PER_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a [N, K] weight (a Linear's layout, blocks along K) into (packed, scales, zero points or None).

    `weight_rows` may be any array or tensor slicable by rows (a memory-mapped safetensors slice): it is read
    `rows` rows at a time, so one slice is in fp32 at once. `importance` (mse only): one non-negative weight per
    input column (K), e.g. the mean square of the inputs, multiplying `search_weights`.
    """
    n, k = weight_rows.shape
    if bits not in (4, 8):
        raise BuildError(f"MatMulNBits weights are quantized at 4 or 8 bits here, not {bits}")
    if k % block_size:
        raise BuildError(f"a {n} x {k} weight does not split into blocks of {block_size}")
    if method not in METHODS:
        raise BuildError(f"quantizer {method!r} is not one of {', '.join(METHODS)}")
    imp = None
    if importance is not None:
        if method != "mse":
            raise BuildError("an importance weights the mse search; rtn has nothing to weight")
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape != (k,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise BuildError(f"the importance must be {k} finite non-negative numbers, one per input column")
    blocks = k // block_size
    packed = np.empty((n, k * bits // 8), dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, (blocks * bits + 7) // 8), dtype=np.uint8)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = as_fp32(weight_rows[start:stop])
        if method == "rtn":
            p, s, z = _ort_rtn(chunk, bits, block_size, symmetric)
        else:
            codes, s, zp = _search(chunk, bits, block_size, symmetric, imp)
            p, z = pack(codes, bits), None if symmetric else pack(zp, bits)
        packed[start:stop], scales[start:stop] = p, s
        if zero_points is not None:
            zero_points[start:stop] = z
    return packed, scales, zero_points


def digest(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> str:
    """SHA-256 of a quantized matrix as MatMulNBits reads it, in the checkpoint's row order: its packed weight,
    scales and zero points, each C-contiguous. The build records one per matrix; the dequantized check
    recomputes it from the graph's initializers (their rows are the same bytes, split or not)."""
    h = hashlib.sha256()
    for part in (packed, scales, zeros):
        if part is not None:
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def dequantize(packed, scales, zero_points, bits: int, block_size: int, shape) -> np.ndarray:
    """The fp32 [N, K] weight the kernels compute with: (q - zero point) * scale, blockwise along K."""
    n, k = shape
    blocks = k // block_size
    q = unpack(np.asarray(packed).reshape(n, -1), bits, k).reshape(n, blocks, block_size)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), dtype=np.float32)
    else:
        zp = unpack(np.asarray(zero_points).reshape(n, -1), bits, blocks).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32).reshape(n, blocks)
    return ((q.astype(np.float32) - zp[..., None]) * s[..., None]).reshape(n, k)


def block_codes(block: np.ndarray, bits: int, symmetric: bool, importance=None):
    """The mse search on one column of blocks, a [N, block] slice: (codes [N, block], scales [N], zero points
    [N]), a weight being (code - zero point) * scale. GPTQ chooses each block's parameters with it."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    codes, scales, zeros = _search(block, bits, block.shape[1], symmetric, importance)
    return codes, scales[:, 0], zeros[:, 0]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] integers in 0 .. 2^bits - 1 into [R, ceil(C * bits / 8)] bytes, low nibble first at 4 bits."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes of each row of packed bytes."""
    if bits == 8:
        return data[:, :count]
    return np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)[:, :count]


def search_weights(weight: np.ndarray, block_size: int, importance=None) -> np.ndarray:
    """How much each weight's squared error counts in the mse search: rms(block) + |w| (llama.cpp's K-quant
    weights without an importance matrix: a block's large weights, which dominate its share of the output, are
    fitted more closely; plain squared error lowered the weights' error but not the model's KL at block 128),
    times the input column's importance when one is given."""
    x = np.asarray(weight, np.float32)
    blocks = x.reshape(x.shape[0], -1, block_size)
    w = np.sqrt(np.einsum("ijk,ijk->ij", blocks, blocks) / np.float32(block_size))[..., None] + np.abs(blocks)
    w = w.reshape(x.shape)
    if importance is not None:
        w *= np.asarray(importance, np.float32).reshape(1, -1)
    return w


def block_error(weight: np.ndarray, approx: np.ndarray, block_size: int, weights=None) -> np.ndarray:
    """Each block's weighted squared error (weights per element or per column, default 1), in float64."""
    diff = (np.asarray(weight, np.float64) - np.asarray(approx, np.float64)) ** 2
    if weights is not None:
        diff = diff * np.broadcast_to(np.asarray(weights, np.float64), diff.shape)
    return diff.reshape(diff.shape[0], -1, block_size).sum(-1)


def as_fp32(tensor) -> np.ndarray:
    import torch

    if isinstance(tensor, torch.Tensor):
        return tensor.to(torch.float32).numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _ort_rtn(chunk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_4bits,
        quantize_matmul_8bits,
    )

    kernel = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    cols, k = chunk.shape
    blocks = k // block_size
    fp32 = np.ascontiguousarray(chunk.T)  # the kernel takes B of MatMul(A, B): [K, N]
    p = np.zeros((cols, blocks, block_size * bits // 8), dtype=np.uint8)
    s = np.zeros((cols, blocks), dtype=np.float32)
    z = np.zeros((cols, (blocks * bits + 7) // 8), dtype=np.uint8)
    kernel(p, fp32, s, z, block_size, cols, k, symmetric)
    return p.reshape(cols, -1), s, z


def _search(chunk: np.ndarray, bits: int, block_size: int, symmetric: bool, importance):
    """mse on a [R, K] slice: (codes [R, K], scales [R, blocks], zero points [R, blocks]), rows in parallel
    groups (numpy releases the GIL inside its loops, so the cores share the work)."""
    r, k = chunk.shape
    blocks = k // block_size
    codes = np.empty((r, k), dtype=np.uint8)
    scales = np.empty((r, blocks), dtype=np.float32)
    zps = np.empty((r, blocks), dtype=np.uint8)
    step = max(1, SEARCH_ELEMENTS // k)

    def part(start: int) -> None:
        stop = min(r, start + step)
        x = chunk[start:stop].reshape(-1, block_size)
        w = search_weights(chunk[start:stop], block_size, importance).reshape(-1, block_size)
        q, s, z = (_search_symmetric if symmetric else _search_asymmetric)(x, w, bits)
        codes[start:stop], scales[start:stop], zps[start:stop] = (
            q.reshape(stop - start, k), s.reshape(stop - start, blocks), z.reshape(stop - start, blocks))

    starts = range(0, r, step)
    workers = min(len(starts), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(part, starts))
    else:
        for start in starts:
            part(start)
    return codes, scales, zps


class _Best:
    """The best candidate of each block so far: its score (the weighted squared error its least-squares scale
    removes from sum w x^2: larger is better), that scale, and a tag that re-creates its integers."""

    def __init__(self, n: int):
        self.score = np.full(n, -np.inf, dtype=np.float32)
        self.scale = np.zeros(n, dtype=np.float32)
        self.tag = np.zeros(n, dtype=np.float32)  # 0: round-to-nearest's integers

    def offer(self, sxq: np.ndarray, sqq: np.ndarray, tag) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(sqq > 0, sxq * sxq / sqq, 0).astype(np.float32)
            scale = np.where(sqq > 0, sxq / sqq, 0).astype(np.float32)
        better = score > self.score
        self.score = np.where(better, score, self.score)
        self.scale = np.where(better, scale, self.scale)
        self.tag = np.where(better, tag, self.tag)
        return better


def _sums(wx: np.ndarray, w: np.ndarray, q: np.ndarray, tmp: np.ndarray):
    """Per block: sum w x q and sum w q^2, the two numbers a least-squares scale needs."""
    np.multiply(w, q, out=tmp)
    return np.einsum("ij,ij->i", wx, q), np.einsum("ij,ij->i", tmp, q)


def _rounded(values: np.ndarray, lo, hi, out: np.ndarray) -> np.ndarray:
    np.rint(values, out=out)
    if np.ndim(lo):
        np.maximum(out, lo, out=out)
        return np.minimum(out, hi, out=out)
    return np.clip(out, lo, hi, out=out)


def _search_symmetric(x: np.ndarray, w: np.ndarray, bits: int):
    """[M, B] blocks -> (codes, scales, zero points): q = round(x / scale) in -2^(bits-1) .. 2^(bits-1) - 1."""
    nmax = float(1 << (bits - 1))
    lo, hi = -nmax, nmax - 1
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]  # the signed extreme, as ORT takes it
    rtn_scale = (m / np.float32(-nmax)).astype(np.float32)
    zero = rtn_scale == 0
    q0 = _rounded(x / np.where(zero, np.float32(1), rtn_scale)[:, None], lo, hi, np.empty_like(x))
    xn = x / np.where(zero, np.float32(1), m)[:, None]  # in [-1, 1]: a candidate's integers: round(-d * xn)
    wx = w * xn
    q, tmp = np.empty_like(x), np.empty_like(x)
    best = _Best(len(x))
    best.offer(*_sums(wx, w, q0, tmp), 0)
    for f in COARSE[bits]:
        _rounded(np.multiply(xn, np.float32(-nmax * f), out=q), lo, hi, q)
        best.offer(*_sums(wx, w, q, tmp), np.float32(nmax * f))
    centre = np.where(best.tag == 0, np.float32(nmax), best.tag)
    for delta in (-FINE[bits], FINE[bits]):
        divisor = (centre + np.float32(nmax * delta)).astype(np.float32)
        _rounded(np.multiply(xn, -divisor[:, None], out=q), lo, hi, q)
        best.offer(*_sums(wx, w, q, tmp), divisor)
    _rounded(np.multiply(xn, -best.tag[:, None], out=q), lo, hi, q)
    q = np.where(best.tag[:, None] == 0, q0, q)
    # once more rounded at the winner's least-squares scale: each weight to its nearest level
    refit = np.where(best.scale == 0, np.float32(1), best.scale)
    _rounded(np.divide(xn, refit[:, None], out=tmp), lo, hi, tmp)
    again = best.offer(*_sums(wx, w, tmp, np.empty_like(x)), -1)
    q = np.where(again[:, None], tmp, q)
    scale = (best.scale * m).astype(np.float32)
    keep = _no_better(x, w, q, scale, q0, rtn_scale) | zero
    scale = np.where(keep, rtn_scale, scale)
    q = np.where(keep[:, None], q0, q)
    return (q + nmax).astype(np.uint8), scale, np.full(len(x), int(nmax), np.uint8)


def _search_asymmetric(x: np.ndarray, w: np.ndarray, bits: int):
    """[M, B] blocks -> (codes, scales, zero points): q = round(x / scale) + zero point in 0 .. 2^bits - 1.

    A candidate divisor d of the block's span puts the zero point where the minimum (or, tag negative, the
    maximum) falls on a level; the integers relative to it are round(d * x / span), clamped by it."""
    qmax = float((1 << bits) - 1)
    mn = np.minimum(x.min(-1), 0)
    mx = np.maximum(x.max(-1), 0)
    span = (mx - mn).astype(np.float32)
    rtn_scale = (span / np.float32(qmax)).astype(np.float32)
    zero = rtn_scale == 0
    safe = np.where(zero, np.float32(1), rtn_scale)
    rtn_zp = np.clip(np.rint(-mn / safe), 0, qmax).astype(np.float32)
    q0 = np.rint(x / safe[:, None])
    np.clip(q0 + rtn_zp[:, None], 0, qmax, out=q0)
    q0 -= rtn_zp[:, None]  # relative to the zero point: the weight is q0 * scale
    span_safe = np.where(zero, np.float32(1), span)
    xn = x / span_safe[:, None]
    mnn, mxn = mn / span_safe, mx / span_safe
    wx = w * xn
    q, tmp = np.empty_like(x), np.empty_like(x)

    def candidate(tag: np.ndarray, out: np.ndarray) -> np.ndarray:
        d = np.abs(tag)
        zp = np.clip(np.where(tag > 0, np.rint(-mnn * d), qmax - np.rint(mxn * d)), 0, qmax).astype(np.float32)
        _rounded(np.multiply(xn, d[:, None], out=out), -zp[:, None], (qmax - zp)[:, None], out)
        return zp

    best = _Best(len(x))
    best.offer(*_sums(wx, w, q0, tmp), 0)
    for f in COARSE[bits]:
        for side in (1, -1):
            tag = np.full(len(x), np.float32(side * qmax * f))
            candidate(tag, q)
            best.offer(*_sums(wx, w, q, tmp), tag)
    won = best.tag != 0
    zp = np.where(won, candidate(np.where(won, best.tag, np.float32(qmax)), q), rtn_zp)
    q = np.where(won[:, None], q, q0)
    refit = np.where(best.scale == 0, np.float32(1), best.scale)
    _rounded(np.divide(xn, refit[:, None], out=tmp), -zp[:, None], (qmax - zp)[:, None], tmp)
    again = best.offer(*_sums(wx, w, tmp, np.empty_like(x)), -1)
    q = np.where(again[:, None], tmp, q)
    scale = (best.scale * span).astype(np.float32)
    keep = _no_better(x, w, q, scale, q0, rtn_scale) | zero
    scale = np.where(keep, rtn_scale, scale)
    q = np.where(keep[:, None], q0, q)
    zp = np.where(keep, rtn_zp, zp)
    return (q + zp[:, None]).astype(np.uint8), scale, zp.astype(np.uint8)


def _no_better(x, w, q, scale, q0, rtn_scale) -> np.ndarray:
    """Blocks where the search did not strictly lower the error of round-to-nearest's (q0, scale), computed as
    the kernels compute the weights (float32 products): rounding in the search's sums can then never leave a
    block worse than rtn's."""
    def error(q_, s_):
        d = x - q_ * s_[:, None]
        return np.einsum("ij,ij->i", w * d, d)

    return error(q, scale) >= error(q0, rtn_scale)
