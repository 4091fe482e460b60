"""The check against the dequantized reference: exact on a healthy build, failing on a broken one, on any
checkpoint (random weights included)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faults
import numpy as np
import pytest

from phiedge import catalog
from phiedge.artifacts import RECORD
from phiedge.build import graph_fixes
from phiedge.build.exports import Exports
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.checkpoints import corpus
from phiedge.checkpoints.corpus import split_files
from phiedge.checkpoints.weights import Weights
from phiedge.checks import dequantized
from phiedge.checks.validate import REPORT, ValidationFailed, with_overrides
from phiedge.cli import cli
from phiedge.quantize import prequant, quantizer
from phiedge.schema import Int4Settings

FAULTS = {"damaged data file": faults.overwrite_data, "wrong scales": faults.scale,
          "swapped rows": faults.swap_rows, "transposed weight": faults.transpose,
          "swapped tensors": faults.swap_tensors}


def test_relative_rms_ignores_a_shift_and_measures_the_rest():
    """Softmax ignores a constant added to a position's logits, so the metric does; a 10% scale is 0.1."""
    import torch

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 50)).astype(np.float32)

    def reference(ids):
        return type("Out", (), {"logits": torch.from_numpy(logits[:ids.shape[1]])[None]})()

    ids = list(range(300))
    same = dequantized.metrics(reference, lambda x: logits[:len(x)] + 3.0, ids, 300)
    assert same["logits_rel_rms"] < 1e-6 and same["kl_mean"] < 1e-12 and same["top1"] == 1.0
    scaled = dequantized.metrics(reference, lambda x: logits[:len(x)] * 1.1, ids, 300)
    assert scaled["logits_rel_rms"] == pytest.approx(0.1, rel=1e-5) and scaled["positions"] == 300


def test_layerwise_dequantized_reference_is_the_whole_one(checkpoints):
    """Big models get the reference one layer at a time: same dequantized weights, same logits; the tied LM
    head is quantized apart from the table (4 bits, table 8)."""
    import torch

    int4 = Int4Settings(method="stream", block_size=128, embeddings="int8")
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    whole = dequantized.load(checkpoints["phi-4-mini"], int4, layerwise=False)
    layerwise = dequantized.load(checkpoints["phi-4-mini"], int4, layerwise=True)
    original = dequantized.load_reference(checkpoints["phi-4-mini"], layerwise=False)
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (whole, layerwise, original))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the quantization error is in it
    assert whole.lm_head.weight is not whole.model.embed_tokens.weight
    assert not torch.equal(whole.lm_head.weight, whole.model.embed_tokens.weight)
    table = original.model.embed_tokens.weight.detach()
    expected = quantizer.dequantize(*quantizer.quantize(table, 8, 128, True), 8, 128, tuple(table.shape))
    assert np.array_equal(whole.model.embed_tokens.weight.detach().numpy(), expected)


@pytest.mark.parametrize("int4", [{"block_size": 128, "symmetric": True, "embeddings": "int8", "lm_head_bits": 4,
                                   "quantizer": "rtn", "eight_bit": []},
                                  {"block_size": 32, "symmetric": False, "embeddings": "int4", "lm_head_bits": 8,
                                   "quantizer": "mse", "eight_bit": ["*.qkv_proj", "model.layers.1.*"]}])
def test_the_reference_has_the_weights_the_quantized_checkpoint_stores(checkpoints, tmp_path, int4):
    """Every matrix prequant.write stores, dequantized, is the reference's weight for it: same tensors, bits,
    block, symmetry, quantizer and 8-bit layer matrices (a change to what write quantizes, and how, shows here first)."""
    import torch
    from safetensors import safe_open

    ckpt = checkpoints["phi-4-mini"]
    prequant.write(Path(ckpt), tmp_path / "q", int4["block_size"], int4["symmetric"], int4["lm_head_bits"],
                   int4["embeddings"], quantizer=int4["quantizer"], eight_bit=int4["eight_bit"])
    stored = {}
    for path in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            stored.update((name, f.get_tensor(name).numpy()) for name in f.keys()
                          if name.endswith((".qweight", ".scales", ".qzeros")))  # the norms stay bf16
    settings = Int4Settings(method="stream", **int4)
    transform = dequantized.dequantizer(settings)
    weights = Weights(Path(ckpt))
    sources = {**{name[:-len(".weight")]: name for name in weights.names()}, "lm_head": prequant.EMBEDDING}
    quantized = sorted(name[:-len(".qweight")] for name in stored if name.endswith(".qweight"))
    assert len(quantized) == prequant.count_matrices(Path(ckpt), int4["embeddings"])
    for prefix in quantized:
        source = sources[prefix]
        name = "lm_head.weight" if prefix == "lm_head" else source
        bits = dequantized.bits_of(name, settings)
        tensor = weights.tensor(source).to(torch.float32)
        expected = quantizer.dequantize(stored[f"{prefix}.qweight"], stored[f"{prefix}.scales"],
                                        None if int4["symmetric"] else stored[f"{prefix}.qzeros"], bits,
                                        int4["block_size"], tuple(tensor.shape))
        got = transform(name, tensor)
        assert np.array_equal(got.numpy(), expected), prefix
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(transform(norm, weights.tensor(norm)), weights.tensor(norm))  # stored as it is


def test_the_check_applies_to_method_stream_int4_only():
    assert dequantized.not_applicable("int4", Int4Settings(method="stream")) is None
    assert dequantized.not_applicable("int4", {"method": "stream", "block_size": 32}) is None
    assert "builder quantized the graph" in dequantized.not_applicable("int4", Int4Settings(method="builder"))
    assert "fp32 has no quantized weights" in dequantized.not_applicable("fp32", None)
    assert "build record" in dequantized.not_applicable("int4", None)


@pytest.mark.parametrize("variant", ["phi-4-mini", "phi-3-mini-4k"])
def test_healthy_synth_int4_build_passes_the_enforced_check(builds, variant):
    report = json.loads((builds(variant, "int4") / "validation.json").read_text())
    dq = report["dequantized"]
    assert not report["enforced"] and report["failures"]  # against the original: random weights, not enforced
    assert dq["applies"] and dq["passed"] and not dq["failures"] and report["passed"]
    assert 0 < dq["metrics"]["logits_rel_rms"] < dq["thresholds"]["logits_rel_rms"] / 2
    assert dq["metrics"]["kl_mean"] < 1e-4 and dq["metrics"]["positions"] == 512
    record = json.loads((builds(variant, "int4") / "phiedge_build.json").read_text())
    assert record["validation"]["dequantized"] == dq


def test_targets_set_the_limit_and_overrides_reach_it():
    from pydantic import ValidationError

    for target in catalog.targets().values():
        if target.int4.method == "stream" and (target.checks is None or target.checks.numeric):
            assert target.validation.dequantized.logits_rel_rms, target.name
    settings = catalog.find_target("cpu").validation
    changed = with_overrides(settings, "int4", {"dequantized.logits_rel_rms": 0.2, "kl_mean": 1e-3})
    assert changed.dequantized.logits_rel_rms == 0.2 and changed.thresholds["int4"].kl_mean == 1e-3
    assert changed.dequantized.eval_tokens == settings.dequantized.eval_tokens
    with pytest.raises(ValidationError, match="kl_max"):
        with_overrides(settings, "int4", {"dequantized.kl_max": 1.0})


def test_fp32_builds_say_why_the_check_does_not_apply(builds):
    report = json.loads((builds("phi-4-mini", "fp32") / "validation.json").read_text())
    assert not report["dequantized"]["applies"] and "fp32" in report["dequantized"]["why"]


# The faults change every position's logits, so a short evaluation shows them as well as the targets' 2048
# held-out tokens would, in a fraction of the time (these tests run ten validations).
SHORT_EVAL = 128


def short_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(split_files()[1][0].read_text(encoding="utf-8")[:600], encoding="utf-8")
    return path


def damaged_copy(builds, tmp_path, fault: str):
    damaged = tmp_path / "damaged"
    shutil.copytree(builds("phi-4-mini", "int4"), damaged)
    FAULTS[fault](damaged)
    return damaged


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_synth_int4_build_fails_validate(builds, checkpoints, tmp_path, runner, fault):
    damaged = damaged_copy(builds, tmp_path, fault)
    result = runner.invoke(cli, ["validate", str(damaged), "--reference", checkpoints["phi-4-mini"],
                                 "--text", str(short_text(tmp_path)), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "Traceback" not in result.output
    assert "logits_rel_rms" in error and "against the dequantized reference exceeds the maximum" in error
    assert "top1" not in error  # the original's thresholds stay unenforced on random weights
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["dequantized"]["failures"]
    assert report["dequantized"]["metrics"]["positions"] >= 64


@pytest.fixture(scope="module")
def export(builds, checkpoints, tmp_path_factory):
    """The synth int4 build's export, for build's own sharing of exports: the fault tests run phiedge's
    stages after Olive (fixes, checks, validation) without running Olive again."""
    built = builds("phi-4-mini", "int4")
    root = tmp_path_factory.mktemp("dq-export")
    olive_output = root / "olive-output"
    olive_output.mkdir()
    for path in built.iterdir():
        if path.name not in (RECORD, REPORT):
            shutil.copy2(path, olive_output / path.name)
    exports = Exports(root / "exports")
    record = json.loads((built / RECORD).read_text())
    exports.put(Exports.key(plan(checkpoints["phi-4-mini"], "cpu"), None), olive_output, record["olive_passes"], "cpu")
    return exports


@pytest.fixture
def short_eval(monkeypatch):
    held_out = corpus.eval_ids
    monkeypatch.setattr(corpus, "eval_ids", lambda model_dir, n: held_out(model_dir, min(n, SHORT_EVAL)))


def test_a_sound_build_passes_with_the_check_enforced(checkpoints, export, tmp_path, short_eval):
    record = build(checkpoints["phi-4-mini"], "cpu", tmp_path / "out", BuildOptions(), exports=export)
    dq = record["validation"]["dequantized"]
    assert dq["applies"] and dq["passed"] and record["validation"]["passed"] and not record["validation"]["enforced"]
    assert dq["metrics"]["positions"] == SHORT_EVAL


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_synth_int4_build_fails_build(checkpoints, export, tmp_path, monkeypatch, short_eval, fault):
    """The fault enters between the export and phiedge's checks (where the graph fixes run), so the build's
    own validation must catch it; nothing is written."""
    fix = graph_fixes.layernorm_epsilon

    def damaged_then_fixed(model_file, config):
        FAULTS[fault](model_file.parent)
        return fix(model_file, config)

    monkeypatch.setattr(graph_fixes, "layernorm_epsilon", damaged_then_fixed)
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match=r"logits_rel_rms \S+ against the dequantized reference exceeds"):
        build(checkpoints["phi-4-mini"], "cpu", out, BuildOptions(), exports=export)
    assert not out.exists()
