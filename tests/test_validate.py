import json
import math
import shutil

import numpy as np
import pytest

from phiedge import catalog
from phiedge.build import BuildOptions, build
from phiedge.cli import cli
from phiedge.errors import ConfigError
from phiedge.schema import Thresholds
from phiedge.validate import Sums, ValidationFailed, accumulate, check, raise_on_failure, validate_build


def test_identical_logits_give_zero_kl_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 50)).astype(np.float32)
    sums = Sums(kl=[])
    accumulate(sums, logits, logits, rng.integers(0, 50, 10))
    assert max(sums.kl) < 1e-12 and sums.top1 == 10 and abs(sums.prob_change) < 1e-9
    assert sums.nll_ref == pytest.approx(sums.nll_built)


def test_kl_matches_the_definition():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
    sums = Sums(kl=[])
    accumulate(sums, np.log(p)[None], np.log(q)[None], np.array([1]))
    assert sums.kl[0] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert sums.prob_change == pytest.approx(0.3 - 0.2)
    assert sums.nll_built == pytest.approx(-math.log(0.3))


def test_check_names_the_metric_and_the_margin():
    metrics = {"kl_mean": 3e-3, "kl_p99": 0.01, "top1": 0.8, "ppl_ratio": 1.0, "greedy": 1.0}
    failures = check(metrics, Thresholds(kl_mean=1e-3, top1=0.9, kl_p99=0.1))
    assert failures == ["kl_mean 0.003 exceeds the maximum 0.001 (3x)", "top1 0.8 is below the minimum 0.9"]


def test_trained_fp32_build_is_exact(builds):
    report = json.loads((builds("trained", "fp32") / "validation.json").read_text())
    m = report["metrics"]
    assert report["enforced"] and report["passed"]
    assert m["kl_mean"] < 1e-4 and m["top1"] > 0.999 and m["greedy"] == 1.0
    assert m["positions"] == 2047
    assert m["perplexity_reference"] < 0.2 * catalog.find_variant("phi-4-mini").config["vocab_size"] / 2


def test_trained_int4_default_build_is_within_the_cpu_thresholds(builds):
    report = json.loads((builds("trained", "int4") / "validation.json").read_text())
    limits = catalog.find_target("cpu").validation.thresholds["int4"]
    m = report["metrics"]
    assert report["enforced"] and report["passed"], report["failures"]
    assert 0 < m["kl_mean"] <= limits.kl_mean and m["top1"] >= limits.top1 and m["ppl_ratio"] <= limits.ppl_ratio
    assert report["size_bytes"] < json.loads((builds("trained", "fp32") / "validation.json").read_text())["size_bytes"]


def test_damaged_weights_fail_validation(builds, trained, tmp_path, runner):
    damaged = tmp_path / "damaged"
    shutil.copytree(builds("trained", "fp32"), damaged)
    data = damaged / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    start = len(raw) // 2
    raw[start:start + 65536] = np.random.default_rng(0).normal(0, 1, 16384).astype(np.float32).tobytes()
    data.write_bytes(bytes(raw))
    with pytest.raises(ValidationFailed, match="kl_mean .* exceeds"):
        raise_on_failure(validate_build(damaged, trained))
    result = runner.invoke(cli, ["validate", str(damaged), "--reference", trained, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_random_weights_enforce_fp32_only(builds, checkpoints):
    int4 = validate_build(builds("phi-4-mini", "int4"), checkpoints["phi-4-mini"], overrides={"top1": 0.99})
    assert not int4["enforced"] and int4["failures"] and "random-weight" in int4["note"]
    raise_on_failure(int4)  # reported, not raised
    assert int4["passed"] and int4["dequantized"]["passed"]  # the enforced check: against the dequantized weights
    fp32 = validate_build(builds("phi-4-mini", "fp32"), checkpoints["phi-4-mini"], overrides={"kl_mean": 1e-30})
    with pytest.raises(ValidationFailed):
        raise_on_failure(fp32)


def test_a_crossed_threshold_fails_the_build_and_writes_nothing(trained, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValidationFailed, match="kl_mean"):
        build(trained, "cpu", out, BuildOptions(thresholds={"kl_mean": 1e-9}))
    assert list(tmp_path.iterdir()) == []


def test_text_option_and_its_errors(builds, trained, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    report = validate_build(builds("trained", "fp32"), trained, text_file=text)
    assert 16 <= report["metrics"]["positions"] < 400
    text.write_text("x")
    with pytest.raises(ConfigError, match="at least 16"):
        validate_build(builds("trained", "fp32"), trained, text_file=text)
    with pytest.raises(ConfigError, match="cannot read"):
        validate_build(builds("trained", "fp32"), trained, text_file=tmp_path / "missing.txt")


def test_bad_threshold_names_and_values(builds, trained, runner):
    with pytest.raises(ConfigError, match="kl_men"):
        validate_build(builds("trained", "fp32"), trained, overrides={"kl_men": 1.0})
    result = runner.invoke(cli, ["validate", str(builds("trained", "fp32")), "--reference", trained,
                                 "--threshold", "top1=high"])
    assert result.exit_code == 2 and "NAME=NUMBER" in result.output


def test_not_a_model_folder(tmp_path, trained):
    from phiedge.errors import ModelError

    with pytest.raises(ModelError, match="not a built model folder"):
        validate_build(tmp_path, trained)


def test_gptq_recipe_runs_offline_and_passes(trained, tmp_path):
    """Olive's calibrated GPTQ on CPU with stdlib calibration text, then the builder; validated."""
    record = build(trained, "cpu", tmp_path / "gptq", BuildOptions(recipe="cpu-gptq", int4={"method": "builder"}))
    assert record["recipe"] == "cpu-gptq" and record["olive_passes"] == ["gptq", "builder"]
    assert record["validation"]["enforced"] and record["validation"]["passed"]
    dq = record["validation"]["dequantized"]  # the builder quantized: nothing for phiedge to re-create
    assert not dq["applies"] and "int4 method builder" in dq["why"]


def test_unknown_recipe_lists_the_known_ones(trained, tmp_path):
    from phiedge.errors import NotFoundError

    with pytest.raises(NotFoundError, match="known: cpu, cpu-gptq"):
        build(trained, "cpu", tmp_path / "x", BuildOptions(recipe="cpu-awq"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("positions, every", [("sequence_length", True), (1, False)])
def test_logits_every_position_reads_the_graphs_logits_shape(tmp_path, positions, every):
    """Pruned graphs (prune_lm_head: logits [batch, 1, vocab]) are fed token by token; others in one prefill."""
    import onnx
    from onnx import TensorProto, helper

    from phiedge.validate import logits_every_position

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", positions, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", positions, 8])])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert logits_every_position(tmp_path / "model.onnx") is every


def test_default_builds_give_the_last_positions_logits_only(builds):
    from phiedge.validate import logits_every_position

    assert not logits_every_position(builds("phi-4-mini", "int4") / "model.onnx")  # the recipes prune the LM head
