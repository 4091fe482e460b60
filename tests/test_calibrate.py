"""`--calibrate`: importance from the checkpoint over calibration text, weighting the mse search and driving GPTQ,
recorded in the build folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phiedge.artifacts import WEIGHTS
from phiedge.build.plan import BuildOptions, plan
from phiedge.checkpoints.corpus import calibration_ids
from phiedge.checkpoints.weights import Weights
from phiedge.cli import cli
from phiedge.quantize import calibrate, prequant, quantizer


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


def test_calibrated_build_records_its_calibration(calibrated, checkpoints, tmp_path):
    """The build folder holds the importance and the record says where it came from; the cpu target's layers
    are GPTQ's (not the mse search's), and its dequantized check held them to their digests."""
    from safetensors import safe_open

    record = json.loads((calibrated / "phiedge_build.json").read_text())
    assert record["int4"]["calibrate"] and record["int4"]["quantizer"] == "gptq"
    assert record["calibration"] == {"file": calibrate.IMPORTANCE, "source": "stdlib training split",
                                     "tokens": calibrate.TOKENS, "windows": calibrate.TOKENS // 512, "window": 512}
    assert calibrate.IMPORTANCE in record["files"] and WEIGHTS in record["files"]
    dq = record["validation"]["dequantized"]
    assert dq["applies"] and dq["passed"] and dq["metrics"]["logits_rel_rms"] < dq["thresholds"]["logits_rel_rms"] / 2
    with safe_open(str(calibrated / calibrate.IMPORTANCE), framework="np") as f:
        importance = {k: f.get_tensor(k) for k in f.keys()}
        assert list(f.metadata()) == [calibrate.METADATA]  # one key: a map of several is written in hash order
    weights = Weights(Path(checkpoints["phi-4-mini"]))
    name = "model.layers.0.mlp.down_proj"
    w = weights.tensor(name + ".weight")
    searched = quantizer.digest(*quantizer.quantize(w, 4, 128, True, "mse", importance[name]))
    recorded = json.loads((calibrated / WEIGHTS).read_text())["matrices"]
    assert recorded[name] != searched  # GPTQ moved the weights
    again = tmp_path / "again"
    calibrate.save(again, importance, {"tokens": 5, "source": "x", "window": 1, "windows": 5, "seconds": 1.0})
    calibrate.save(tmp_path / "again2", importance, {"windows": 5, "window": 1, "source": "x", "tokens": 5})
    assert again.read_bytes() == (tmp_path / "again2").read_bytes()


def test_the_mse_search_is_weighted_by_the_importance(checkpoints, tmp_path):
    """--quantizer mse with calibration: every layer matrix's stored blocks are the importance-weighted
    search's, which differ from the unweighted one's."""
    ckpt = Path(checkpoints["phi-4-mini"])
    importance, _ = calibrate.collect(ckpt, tokens=200, window=100)
    _, weighted = prequant.write(ckpt, tmp_path / "w", 128, True, 8, "shared", quantizer="mse", importance=importance)
    _, plain = prequant.write(ckpt, tmp_path / "p", 128, True, 8, "shared", quantizer="mse")
    name = "model.layers.0.mlp.down_proj"
    w = Weights(ckpt).tensor(name + ".weight")
    assert weighted[name] == quantizer.digest(*quantizer.quantize(w, 4, 128, True, "mse", importance[name]))
    assert weighted[name] != plain[name] and weighted["model.embed_tokens"] != plain["model.embed_tokens"]


def test_calibrate_options_are_checked(runner, checkpoints, tmp_path):
    """--calibrate needs mse or gptq, gptq needs --calibrate; with rtn, or the builder's quantization, it is
    refused before anything runs."""
    ckpt = checkpoints["phi-4-mini"]
    for extra, message in [(["--calibrate", "--quantizer", "rtn"], "calibrate weights the quantizer"),
                           (["--calibrate", "--int4-method", "builder"], "need method: stream"),
                           (["--no-calibrate", "--quantizer", "gptq"], "quantizer gptq needs calibrate")]:
        result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"), *extra])
        assert result.exit_code != 0 and message in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"),
                                 "--calibrate", "--calibration", str(tmp_path / "none.txt")])
    assert result.exit_code != 0 and "none.txt does not exist" in result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "-o", str(tmp_path / "x"),
                                 "--calibrate", "--calibration", str(empty), "--no-validate"])
    assert result.exit_code == 1 and "too little to calibrate on" in result.output and not (tmp_path / "x").exists()


def test_calibrate_switches_fill_in_the_quantizer(checkpoints):
    """--calibrate on a round-to-nearest target means mse; --no-calibrate on a gptq target means mse, said."""
    ckpt = checkpoints["phi-4-mini"]
    p = plan(ckpt, "cpu", BuildOptions(int4={"calibrate": False}))
    assert p.int4.quantizer == "mse" and not p.int4.calibrate and any("gptq" in n for n in p.notes)
    p = plan(ckpt, "cpu", BuildOptions(int4={"quantizer": "rtn", "calibrate": False}))
    assert p.int4.quantizer == "rtn"
    assert plan(ckpt, "cpu", BuildOptions(int4={"calibrate": True})).int4.quantizer == "gptq"
