import json

from phiedge import catalog
from phiedge.cli import cli


def test_demo_runs_the_whole_pipeline(runner, tmp_path):
    """The README's main job: synth, fp32 and int4 builds, parity with transformers, a chat turn."""
    out = tmp_path / "demo"
    result = runner.invoke(cli, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    fp32, int4 = summary["builds"]["cpu-fp32"], summary["builds"]["cpu-int4"]
    assert fp32["greedy_identical"] == 1.0 and fp32["validation_enforced"] and fp32["validation_passed"]
    assert fp32["kl_mean"] < 1e-4 and fp32["top1"] > 0.999
    assert not int4["validation_enforced"]  # random weights: quantization error means nothing
    # ...but the graph must compute what its dequantized weights do: that check is enforced and passes
    assert int4["validation_passed"] and int4["dequantized_check"]["applies"] and int4["dequantized_check"]["passed"]
    limit = catalog.find_target("cpu").validation.dequantized.logits_rel_rms
    assert 0 < int4["dequantized_check"]["logits_rel_rms"] < limit
    assert not fp32["dequantized_check"]["applies"]
    assert int4["size_bytes"] < fp32["size_bytes"]
    assert int4["max_length"] == 4096
    assert summary["sample"]["new_tokens"] > 0
    assert summary["sample"]["prompt"].startswith("<|user|>")
    for name in ("checkpoint", "cpu-fp32", "cpu-int4"):
        assert (out / name).is_dir()
    again = runner.invoke(cli, ["demo", "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
