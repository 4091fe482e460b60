"""`--calibrate`: importance from the checkpoint over calibration text, weighting the mse search, re-created by
validation from the build folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phiedge.checkpoints.corpus import calibration_ids
from phiedge.checkpoints.weights import Weights
from phiedge.checks import dequantized
from phiedge.cli import cli
from phiedge.quantize import calibrate, prequant, quantizer
from phiedge.schema import Int4Settings

CALIBRATED = {"quantizer": "mse", "calibrate": True}


@pytest.fixture(scope="module")
def calibrated(builds) -> Path:
    """The cpu target's int4 build, calibrated by default (the session's build, reused)."""
    return builds("phi-4-mini", "int4")


def test_importance_is_each_inputs_mean_square(checkpoints):
    """Layer by layer, hooks on every Linear: the same mean squares as the whole model in memory gives, computed
    here another way (the inputs each Linear sees, from the modules' own outputs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoints["phi-4-mini"]
    importance, run = calibrate.collect(ckpt, tokens=300, window=100)
    assert run["tokens"] == 300 and run["windows"] == 3
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = calibration_ids(AutoTokenizer.from_pretrained(ckpt), 300)
    batch = torch.tensor([ids[i:i + 100] for i in range(0, 300, 100)])
    with torch.no_grad():
        out = model(input_ids=batch, output_hidden_states=True)
        layer0 = model.model.layers[0]
        normed = layer0.input_layernorm(out.hidden_states[0])
    mean_square = lambda x: (x.double() ** 2).reshape(-1, x.shape[-1]).mean(0).float().numpy()  # noqa: E731
    np.testing.assert_allclose(importance["model.layers.0.self_attn.qkv_proj"], mean_square(normed), rtol=1e-4)
    np.testing.assert_allclose(importance["lm_head"], mean_square(out.hidden_states[-1]), rtol=1e-4)
    names = {n[: -len(".weight")] for n in Weights(Path(ckpt)).names() if prequant.is_linear(n)}
    assert set(importance) == names | {"lm_head"}
    down = importance["model.layers.1.mlp.down_proj"]
    assert down.shape == (model.config.intermediate_size,) and np.all(down >= 0) and down.std() > 0


def test_calibrated_build_records_and_uses_its_importance(calibrated, checkpoints, tmp_path):
    """The build folder holds the importance and the record says where it came from; the stored weights are
    the importance-weighted search's (not the unweighted one's), and validation re-created them."""
    from safetensors import safe_open

    record = json.loads((calibrated / "phiedge_build.json").read_text())
    assert record["int4"]["calibrate"] and record["int4"]["quantizer"] == "mse"
    assert record["calibration"] == {"file": calibrate.IMPORTANCE, "source": "stdlib training split",
                                     "tokens": calibrate.TOKENS, "windows": 16, "window": 512}
    assert calibrate.IMPORTANCE in record["files"]
    importance = calibrate.load(calibrated / calibrate.IMPORTANCE, checkpoints["phi-4-mini"])
    dq = record["validation"]["dequantized"]
    assert dq["applies"] and dq["passed"] and dq["metrics"]["logits_rel_rms"] < dq["thresholds"]["logits_rel_rms"] / 2
    weights = Weights(Path(checkpoints["phi-4-mini"]))
    name = "model.layers.0.mlp.down_proj"
    w = weights.tensor(name + ".weight")
    weighted = quantizer.quantize(w, 4, 128, True, "mse", importance[name])[0]
    plain = quantizer.quantize(w, 4, 128, True, "mse")[0]
    assert not np.array_equal(weighted, plain)
    transform = dequantized.dequantizer(Int4Settings(method="stream", block_size=128, embeddings="shared",
                                                           lm_head_bits=8, **CALIBRATED), importance)
    expected = quantizer.dequantize(weighted, quantizer.quantize(w, 4, 128, True, "mse", importance[name])[1], None,
                                    4, 128, tuple(w.shape))
    assert np.array_equal(transform(name + ".weight", w.float()).numpy(), expected)
    with safe_open(str(calibrated / calibrate.IMPORTANCE), framework="np") as f:
        assert list(f.metadata()) == [calibrate.METADATA]  # one key: a map of several is written in hash order
    again = tmp_path / "again"
    calibrate.save(again, importance, {"tokens": 5, "source": "x", "window": 1, "windows": 5, "seconds": 1.0})
    calibrate.save(tmp_path / "again2", importance, {"windows": 5, "window": 1, "source": "x", "tokens": 5})
    assert again.read_bytes() == (tmp_path / "again2").read_bytes()


def test_validation_needs_the_importance_the_build_used(calibrated, checkpoints, runner, tmp_path):
    """Without its importance file, or with another one, a calibrated build cannot be re-created: a missing or
    unreadable file is one line; an unweighted reference would not be the build's weights."""
    folder = tmp_path / "copy"
    shutil.copytree(calibrated, folder)
    (folder / calibrate.IMPORTANCE).unlink()
    result = runner.invoke(cli, ["validate", str(folder), "--reference", checkpoints["phi-4-mini"]])
    assert result.exit_code == 1 and "built with calibrate" in result.output and "Traceback" not in result.output
    (folder / calibrate.IMPORTANCE).write_bytes(b"not safetensors")
    result = runner.invoke(cli, ["validate", str(folder), "--reference", checkpoints["phi-4-mini"]])
    assert result.exit_code == 1 and "not a readable safetensors file" in result.output
    importance = calibrate.load(calibrated / calibrate.IMPORTANCE, checkpoints["phi-4-mini"])
    calibrate.save(folder / calibrate.IMPORTANCE, {k: v[:-1] for k, v in importance.items()}, {"tokens": 1})
    result = runner.invoke(cli, ["validate", str(folder), "--reference", checkpoints["phi-4-mini"]])
    assert result.exit_code == 1 and "no valid importance for" in result.output


def test_calibrate_options_are_checked(runner, checkpoints, tmp_path):
    """--calibrate implies mse; with rtn, or the builder's quantization, it is refused before anything runs."""
    ckpt = checkpoints["phi-4-mini"]
    for extra, message in [(["--quantizer", "rtn"], "calibrate weights the mse search"),
                           (["--int4-method", "builder"], "need method: stream")]:
        result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"),
                                     "--calibrate", *extra])
        assert result.exit_code != 0 and message in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"),
                                 "--calibrate", "--calibration", str(tmp_path / "none.txt")])
    assert result.exit_code != 0 and "none.txt does not exist" in result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"),
                                 "--calibrate", "--calibration", str(empty), "--no-validate"])
    assert result.exit_code == 1 and "too little to calibrate on" in result.output and not (tmp_path / "x").exists()
