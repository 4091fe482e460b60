"""GPTQ: quantize a Linear weight column by column, each column's rounding error compensated by the columns not
yet quantized, using the second moments of the Linear's inputs (Frantar et al. 2022, `gptq.py` of the paper's code).

With inputs x and H = E[x x^T], a weight error D costs E||D x||^2 = tr(D H D^T) at the Linear's output. Rounding
each weight on its own (rtn, mse) ignores the off-diagonal of H; GPTQ, after rounding column j, moves the other
columns by the least-squares correction that cancels as much of that column's error as the inputs' correlations
allow. On phiedge's trained hidden-768 model it takes the calibrated mse build's KL from 2.9e-3 to 1.3e-3 at the
same bytes (benchmarks/RESULTS.md, "GPTQ").

The layout is MatMulNBits' (quantizer.py): blocks of `block_size` along K, one scale (and zero point) per row
and block. GPTQ's lazy batches coincide with those blocks: when a block starts, its scales are chosen by the
mse search (quantizer.block_codes, weighted by the diagonal of H) on the weights as the earlier columns'
corrections left them, then its columns are rounded one by one at those scales. No act-order: it would need a
column permutation (g_idx) that MatMulNBits does not take.

Linear algebra in torch (float32, every core): at Phi-4-mini's widths on 2 cores, the inverse Cholesky factor
of the down projection's 8192 x 8192 H takes 4.5 s and its 3072 x 8192 weight 4 s more.
"""

from __future__ import annotations

import numpy as np

from phiedge.errors import BuildError
from phiedge.quantize.quantizer import block_codes, pack

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: the paper's default
LEAF = 512  # below this size a triangular inverse is one triangular solve
BATCH = 128  # columns whose errors are spread among themselves before the rest takes them (the paper's)


def inverse_factor(hessian, damp: float = DAMP):
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = H^-1), from one Cholesky
    factorization and one triangular inverse: with J the order reversal, J chol(J H J) J = R is upper
    triangular with H = R R^T, so H^-1 = R^-T R^-1 and U = R^-1."""
    import torch

    h = torch.as_tensor(hessian, dtype=torch.float32).clone()
    k = h.shape[0]
    diag = torch.diagonal(h)
    dead = diag <= 0  # inputs that were always zero: their weights' errors cost nothing and move nothing
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    flip = torch.arange(k - 1, -1, -1)
    lower, info = torch.linalg.cholesky_ex(h[flip][:, flip])
    if int(info):
        raise BuildError(f"GPTQ: the {k} x {k} input second moments are not positive definite after damping")
    return upper_inverse(lower[flip][:, flip])  # of R, upper triangular with H = R R^T


def upper_inverse(r, leaf: int = LEAF):
    """The inverse of an upper triangular matrix, by halves: [[A, B], [0, D]]^-1 = [[A^-1, X], [0, D^-1]] with
    X = -A^-1 B D^-1 from two triangular solves. torch offers no triangular inverse (LAPACK's trtri), and a
    triangular solve against the identity does three times its work: at 8192 x 8192 it took 6.5 s here, the
    halves 2.3 s."""
    import torch

    k = r.shape[0]
    if k <= leaf:
        return torch.linalg.solve_triangular(r, torch.eye(k, dtype=r.dtype), upper=True)
    m = k // 2
    out = torch.zeros_like(r)
    out[:m, :m] = upper_inverse(r[:m, :m], leaf)
    out[m:, m:] = upper_inverse(r[m:, m:], leaf)
    out[:m, m:] = torch.linalg.solve_triangular(
        r[m:, m:], torch.linalg.solve_triangular(r[:m, :m], -r[:m, m:], upper=True), upper=True, left=False)
    return out


def quantize(weight, hessian, bits: int, block_size: int, symmetric: bool, damp: float = DAMP, factor=None):
    """(packed, scales, zero points or None) of a [N, K] weight in MatMulNBits' layout, by GPTQ with the [K, K]
    input second moments `hessian` (calibrate's: the mean of x x^T over the calibration tokens).

    The weight is worked on transposed (one contiguous row per input column), BATCH columns at a time: within a
    batch each rounded column's error moves the batch's later columns at once, the columns after the batch
    take the batch's errors in one matrix product at its end (the paper's lazy batch updates). A quantization
    block's scales are chosen when it starts, from the weights as every earlier column left them. Rows are
    independent: a matrix may be quantized a slice of rows at a time, with `factor` (inverse_factor(hessian,
    damp)) computed once for all slices."""
    import torch

    wt = torch.as_tensor(np.asarray(weight, dtype=np.float32)).T.contiguous()  # [K, N]
    k, n = wt.shape
    if bits not in (4, 8):
        raise BuildError(f"MatMulNBits weights are quantized at 4 or 8 bits here, not {bits}")
    if k % block_size:
        raise BuildError(f"a {n} x {k} weight does not split into blocks of {block_size}")
    if tuple(np.shape(hessian)) != (k, k):
        raise BuildError(f"GPTQ needs {k} x {k} input second moments for a {n} x {k} weight, not {np.shape(hessian)}")
    u = inverse_factor(hessian, damp) if factor is None else factor
    importance = torch.diagonal(torch.as_tensor(hessian, dtype=torch.float32)).clamp(min=0).numpy()
    qmax = (1 << bits) - 1
    codes = torch.empty((k, n), dtype=torch.uint8)
    scales = np.empty((n, k // block_size), dtype=np.float32)
    zeros = np.empty((n, k // block_size), dtype=np.uint8)
    # block sizes are powers of two: a block starts at a batch's start (>= BATCH) or inside it, never across it
    threads = torch.get_num_threads()
    for start in range(0, k, BATCH):
        stop = min(k, start + BATCH)
        part = wt[start:stop].clone()
        errors = torch.empty_like(part)
        torch.set_num_threads(1)  # the column steps are small: thread hand-offs would cost more than they do
        for j in range(stop - start):
            c = start + j
            if c % block_size == 0:  # a block starts: its scales from the weights as they are now
                current = (part[j:j + block_size] if j + block_size <= stop - start else wt[c:c + block_size]).T
                _, s, z = block_codes(current.numpy(), bits, symmetric, importance[c:c + block_size])
                scales[:, c // block_size], zeros[:, c // block_size] = s, z
                scale = torch.from_numpy(s)
                divisor = torch.from_numpy(np.where(s == 0, np.float32(1), s))
                zero = torch.from_numpy(z.astype(np.float32))
            column = part[j]
            code = torch.clamp(torch.round(column / divisor) + zero, 0, qmax)
            codes[c] = code.to(torch.uint8)
            err = (column - (code - zero) * scale) / u[c, c]  # what the kernels compute: 0 for an all-zero block
            part[j + 1:].addr_(u[c, c + 1:stop], err, alpha=-1.0)  # in place: no (batch x N) temporary
            errors[j] = err
        torch.set_num_threads(threads)
        wt[stop:].addmm_(u[start:stop, stop:].T, errors, alpha=-1.0)  # in place: 2 s less at 3072 x 8192 here
    packed = pack(codes.T.contiguous().numpy(), bits)
    return packed, scales, None if symmetric else pack(zeros, bits)
