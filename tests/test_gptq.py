"""GPTQ: lower output error than rounding each weight alone, in the layout ONNX Runtime computes with, from the
calibration's per-layer second moments."""

from __future__ import annotations

import numpy as np
import pytest
from test_quantizer import run_ort

from phiedge.errors import BuildError
from phiedge.quantize import calibrate, gptq, quantizer


def correlated(rng, tokens: int, k: int) -> np.ndarray:
    """Inputs whose columns are correlated and of different sizes, as a layer's activations are."""
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k))
    return (rng.standard_normal((tokens, k)) * rng.uniform(0.2, 3, k)) @ mix.astype(np.float32)


def output_error(w, approx, h) -> float:
    d = (approx - w).astype(np.float64)
    return float(np.sum((d @ h) * d))


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    import torch

    rng = np.random.default_rng(0)
    x = correlated(rng, 512, 96).astype(np.float32)
    h = x.T @ x / len(x)
    h[5, :] = h[:, 5] = 0  # an input that was always zero
    u = gptq.inverse_factor(h)
    damped = torch.tensor(h, dtype=torch.float64)
    damped[5, 5] = 1.0
    damped += gptq.DAMP * damped.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    assert torch.allclose(torch.triu(u), u)
    np.testing.assert_allclose((u.T @ u).double().numpy(), torch.linalg.inv(damped).numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("k", [8, 9, 100])
def test_the_triangular_inverse_by_halves_is_the_inverse(k):
    import torch

    rng = np.random.default_rng(k)
    r = torch.triu(torch.tensor(rng.standard_normal((k, k)), dtype=torch.float32)) + 4 * torch.eye(k)
    u = gptq.upper_inverse(r, leaf=4)  # three levels of halves at k 100, odd halves at 9
    assert torch.equal(torch.triu(u), u)
    torch.testing.assert_close(u @ r, torch.eye(k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_gptq_lowers_the_output_error_of_the_mse_search(bits, symmetric):
    """On inputs whose columns correlate, GPTQ's tr(D H D^T) is well below the importance-weighted mse search's
    (about half at 4 bits), for the same bytes."""
    rng = np.random.default_rng(bits + symmetric)
    n, k, block = 64, 256, 64
    x = correlated(rng, 2048, k).astype(np.float32)
    h = x.T @ x / len(x)
    w = (rng.standard_t(5, (n, k)) * 0.02).astype(np.float32)
    packed, scales, zeros = gptq.quantize(w, h, bits, block, symmetric)
    mine = quantizer.dequantize(packed, scales, zeros, bits, block, w.shape)
    mse = quantizer.dequantize(*quantizer.quantize(w, bits, block, symmetric, "mse", np.diag(h)), bits, block, w.shape)
    assert output_error(w, mine, h) < 0.8 * output_error(w, mse, h)
    assert packed.shape == (n, k * bits // 8) and scales.shape == (n, k // block)
    assert (zeros is None) == symmetric


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, False)])
def test_matmulnbits_computes_with_gptqs_dequantized_weight(bits, symmetric):
    """GPTQ writes the mse search's layout: MatMulNBits computes x @ dequantize(W).T to float32 rounding."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    n, k, block = 24, 96, 32
    x = correlated(rng, 256, k).astype(np.float32)
    w = (rng.standard_t(4, (n, k)) * 0.05).astype(np.float32)
    packed, scales, zeros = gptq.quantize(w, x.T @ x / len(x), bits, block, symmetric)
    reference = quantizer.dequantize(packed, scales, zeros, bits, block, w.shape)
    inits = {"w": packed.reshape(n, k // block, -1), "s": scales, **({} if zeros is None else {"z": zeros})}
    node = helper.make_node("MatMulNBits", ["x", *inits], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    y = run_ort([node], {"x": x[:5]}, inits, "y", TensorProto.FLOAT)
    expected = x[:5].astype(np.float64) @ reference.T.astype(np.float64)
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_zero_blocks_and_dead_inputs_stay_finite():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[:, :32] = 0
    h = np.eye(64, dtype=np.float32)
    h[40, 40] = 0
    packed, scales, _ = gptq.quantize(w, h, 4, 32, True)
    out = quantizer.dequantize(packed, scales, None, 4, 32, w.shape)
    assert np.all(np.isfinite(out)) and np.all(out[:, :32] == 0)


def test_bad_inputs_are_one_line_errors():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(BuildError, match="64 x 64 input second moments"):
        gptq.quantize(w, np.eye(32), 4, 32, True)
    with pytest.raises(BuildError, match="blocks of 48"):
        gptq.quantize(w, np.eye(64), 4, 48, True)
    indefinite = np.eye(64, dtype=np.float32)
    indefinite[0, 1] = indefinite[1, 0] = 5.0  # [[1, 5], [5, 1]]: an eigenvalue of -4
    with pytest.raises(BuildError, match="not positive definite"):
        gptq.quantize(w, indefinite, 4, 32, True)


def test_calibration_gives_each_layers_second_moments(checkpoints):
    """Layer by layer, full matrices: E[x x^T] of each Linear's inputs, whose diagonals are the importance the
    diagonal pass gives; the layer-major pass feeds every layer what the whole model would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phiedge.checkpoints.corpus import calibration_ids

    ckpt = checkpoints["phi-4-mini"]
    run = calibrate.Calibration(ckpt, tokens=200, window=100)
    *layers, (head, head_moments) = list(run.layers(full=True))
    assert [i for i, _ in layers] == list(range(len(layers))) and head == "lm_head"
    assert head_moments["lm_head"].shape == (run.config.hidden_size,) * 2
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = calibration_ids(AutoTokenizer.from_pretrained(ckpt), 200)
    batch = torch.tensor([ids[:100], ids[100:200]])
    seen = []
    model.model.layers[1].mlp.gate_up_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=batch)  # the whole model in memory: what layer 1's MLP really gets
    mlp_in = seen[0].reshape(-1, seen[0].shape[-1]).double()
    expected = (mlp_in.T @ mlp_in / mlp_in.shape[0]).float().numpy()
    got = layers[1][1]["model.layers.1.mlp.gate_up_proj"].numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())
    diagonal, _ = calibrate.collect(ckpt, tokens=200, window=100)
    for name, value in layers[1][1].items():
        np.testing.assert_allclose(np.diag(value.numpy()), diagonal[name], rtol=1e-3)
    np.testing.assert_allclose(run.importance["lm_head"], diagonal["lm_head"], rtol=1e-4)
