"""The check against the dequantized reference: exact on a healthy build, failing on a broken one, on any
checkpoint (random weights included)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import faults
import numpy as np
import pytest

from phiedge import catalog
from phiedge.artifacts import RECORD, WEIGHTS, ModelFolder
from phiedge.build import graph_fixes
from phiedge.build.exports import Exports
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.checkpoints import corpus
from phiedge.checkpoints.corpus import split_files
from phiedge.checks import dequantized
from phiedge.checks.validate import REPORT, ValidationFailed, with_overrides
from phiedge.cli import cli
from phiedge.quantize import prequant, quantizer
from phiedge.schema import Int4Settings

# Each fault, and the metric that must name it: damage to a quantized matrix changes its digest; a graph that
# reads intact weights wrongly, or a float tensor no digest covers, changes the logits.
FAULTS = {"damaged data file": (faults.overwrite_data, "weights_sha256"),
          "wrong scales": (faults.scale, "weights_sha256"),
          "swapped rows": (faults.swap_rows, "weights_sha256"),
          "transposed weight": (faults.transpose, "weights_sha256"),
          "swapped tensors": (faults.swap_tensors, "weights_sha256"),
          "rewired graph": (faults.rewire, "logits_rel_rms"),
          "wrong norm": (faults.norm, "logits_rel_rms")}
MESSAGES = {"weights_sha256": r"weights_sha256: \d+ of \d+ quantized matrices in the graph are missing or differ",
            "logits_rel_rms": r"logits_rel_rms \S+ against the dequantized reference exceeds the maximum"}


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


def test_layerwise_dequantized_reference_is_the_whole_one(builds, checkpoints):
    """Big models get the reference one layer at a time: same dequantized weights, same logits; the LM head is
    the graph's, quantized apart from the table (the session's build shares one 8-bit table: both are it)."""
    import torch

    folder = ModelFolder(builds("phi-4-mini", "int4"))
    graph, recorded = dequantized.GraphWeights(folder), dequantized.digests_of(folder)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    whole = dequantized.load(checkpoints["phi-4-mini"], graph, recorded, layerwise=False)
    layerwise = dequantized.load(checkpoints["phi-4-mini"], graph, recorded, layerwise=True)
    original = dequantized.load_reference(checkpoints["phi-4-mini"], layerwise=False)
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (whole, layerwise, original))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the quantization error is in it
    table = whole.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(table, whole.lm_head.weight.detach().numpy())  # one shared table
    packed, scales, zeros, bits, block = graph.arrays("lm_head")
    assert bits == 8 and np.array_equal(table, quantizer.dequantize(packed, scales, zeros, 8, block, table.shape))


@pytest.mark.parametrize("int4", [{"block_size": 128, "symmetric": True, "embeddings": "int8", "lm_head_bits": 4,
                                   "quantizer": "rtn", "eight_bit": []},
                                  {"block_size": 32, "symmetric": False, "embeddings": "int4", "lm_head_bits": 8,
                                   "quantizer": "mse", "eight_bit": ["*.qkv_proj", "model.layers.1.*"]}])
def test_digests_are_of_the_tensors_the_quantized_checkpoint_stores(checkpoints, tmp_path, int4):
    """prequant.write's digest of every matrix is the SHA-256 of the packed weight, scales and zero points it
    stores, and there is one for every matrix it quantized (the table and the LM head included)."""
    from safetensors import safe_open

    ckpt = checkpoints["phi-4-mini"]
    _, digests = prequant.write(Path(ckpt), tmp_path / "q", int4["block_size"], int4["symmetric"],
                                int4["lm_head_bits"], int4["embeddings"], quantizer=int4["quantizer"],
                                eight_bit=int4["eight_bit"])
    stored = {}
    for path in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            stored.update((name, f.get_tensor(name).numpy()) for name in f.keys()
                          if name.endswith((".qweight", ".scales", ".qzeros")))  # the norms stay bf16
    quantized = sorted(name[:-len(".qweight")] for name in stored if name.endswith(".qweight"))
    assert sorted(digests) == quantized and len(quantized) == prequant.count_matrices(Path(ckpt), int4["embeddings"])
    for prefix in quantized:
        zeros = None if int4["symmetric"] else stored[f"{prefix}.qzeros"]
        assert digests[prefix] == quantizer.digest(stored[f"{prefix}.qweight"], stored[f"{prefix}.scales"], zeros)
    assert len(set(digests.values())) == len(digests)


def test_the_graph_holds_the_recorded_weights(builds):
    """Every matrix the build recorded is in the graph with that digest (gate_up_proj split by the builder into
    gate and up, the shared table as the LM head's tensors), and nothing quantized is unrecorded."""
    folder = ModelFolder(builds("phi-4-mini", "int4"))
    graph, recorded = dequantized.GraphWeights(folder), dequantized.digests_of(folder)
    assert dequantized.mismatched(graph, recorded) == []
    assert len(graph.matrices["model.layers.0.mlp.gate_up_proj"]) == 2
    assert "model.embed_tokens" in recorded.matrices and "lm_head" not in recorded.matrices
    changed = recorded.model_copy(update={"matrices": {**recorded.matrices, "model.layers.0.mlp.down_proj": "0" * 64}})
    assert dequantized.mismatched(graph, changed) == ["model.layers.0.mlp.down_proj"]
    fewer = recorded.model_copy(update={"matrices": {k: v for k, v in recorded.matrices.items()
                                                     if k != "model.layers.1.self_attn.o_proj"}})
    assert dequantized.mismatched(graph, fewer) == ["model.layers.1.self_attn.o_proj"]


def test_validation_needs_the_digests(builds, checkpoints, runner, tmp_path):
    """Without its digest file, or with an unreadable one, a method-stream build cannot be checked: one line."""
    folder = tmp_path / "copy"
    shutil.copytree(builds("phi-4-mini", "int4"), folder)
    (folder / WEIGHTS).unlink()
    result = runner.invoke(cli, ["validate", str(folder), "--reference", checkpoints["phi-4-mini"]])
    assert result.exit_code == 1 and "has no phiedge_weights.json" in result.output and "Traceback" not in result.output
    (folder / WEIGHTS).write_text('{"block_size": 128}')
    result = runner.invoke(cli, ["validate", str(folder), "--reference", checkpoints["phi-4-mini"]])
    assert result.exit_code == 1 and "phiedge_weights.json" in result.output and "Traceback" not in result.output


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
    FAULTS[fault][0](damaged)
    return damaged


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_synth_int4_build_fails_validate(builds, checkpoints, tmp_path, runner, fault):
    damaged = damaged_copy(builds, tmp_path, fault)
    result = runner.invoke(cli, ["validate", str(damaged), "--reference", checkpoints["phi-4-mini"],
                                 "--text", str(short_text(tmp_path)), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "Traceback" not in result.output
    assert re.search(MESSAGES[FAULTS[fault][1]], error), error
    assert "top1" not in error  # the original's thresholds stay unenforced on random weights
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["dequantized"]["failures"]
    if FAULTS[fault][1] == "logits_rel_rms":
        assert report["dequantized"]["metrics"]["positions"] >= 64
    else:
        assert report["dequantized"]["digests"]["mismatched"]


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
        FAULTS[fault][0](model_file.parent)
        return fix(model_file, config)

    monkeypatch.setattr(graph_fixes, "layernorm_epsilon", damaged_then_fixed)
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match=MESSAGES[FAULTS[fault][1]]):
        build(checkpoints["phi-4-mini"], "cpu", out, BuildOptions(), exports=export)
    assert not out.exists()
