import json
import zipfile

import pytest

from phiedge.bundle.verify import verify
from phiedge.cli import cli
from phiedge.errors import PhiedgeError
from phiedge.release import index, release

TARGETS = ["android", "android-npu", "cpu", "ios", "snapdragon-npu", "windows-dml"]


@pytest.fixture(scope="module")
def first(checkpoints, tmp_path_factory):
    from click.testing import CliRunner

    dist = tmp_path_factory.mktemp("release") / "dist"
    result = CliRunner().invoke(cli, ["build", "--all-targets", "--model", checkpoints["phi-4-mini"], "-o", str(dist)])
    assert result.exit_code == 0, result.output
    return dist, json.loads(result.stdout), result.stderr


def test_all_targets_give_bundles_and_an_index(first):
    dist, shown, progress = first
    saved = json.loads((dist / "release.json").read_text())
    assert saved == shown and [b["target"] for b in saved["bundles"]] == TARGETS
    assert sorted(p.name for p in dist.iterdir()) == sorted([b["file"] for b in saved["bundles"]] +
                                                            ["RELEASE.md", "release.json"])
    for b in saved["bundles"]:
        assert (dist / b["file"]).stat().st_size == b["size_bytes"]
        assert b["file"] == f"phi-4-mini-synth-int4-{b['target']}-phiedge0.1.0.zip"
    by = {b["target"]: b for b in saved["bundles"]}
    assert by["cpu"]["bench"]["tg32"] > 0 and "bench" not in by["snapdragon-npu"]  # a simulator's speed is no device's
    for target in ("android", "cpu", "ios"):  # the numbers the bundle's own validation report holds
        with zipfile.ZipFile(dist / by[target]["file"]) as zf:
            report = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/validation.json"))))
        numbers = {k: report["metrics"][k] for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio", "greedy")}
        # random weights: int4 thresholds not enforced, so no verdict
        assert by[target]["validation"] == {**numbers, "enforced": False, "passed": True}, target  # dequantized check
        assert report["target"] == target and report["metrics"]["positions"] == 2047
    assert by["windows-dml"]["validation"] is None and "bench" not in by["windows-dml"]
    assert "dml is not available" in by["windows-dml"]["not_validated_because"]
    md = (dist / "RELEASE.md").read_text()
    assert all(f"| {t} |" in md for t in TARGETS) and "not run here" in md and md.count("(not enforced)") == 5
    for target in ("android-npu", "snapdragon-npu"):  # random weights; no dequantized check (method builder)
        assert by[target]["validation"]["enforced"] is False and by[target]["validation"]["passed"] is None
    phone = verify(dist / by["android-npu"]["file"])  # compiled for the phone's chip, loaded on its simulator
    assert phone["loaded"] is True and "bench" not in by["android-npu"]
    with zipfile.ZipFile(dist / by["android-npu"]["file"]) as zf:
        names = zf.namelist()
    assert any(n.endswith("app/src/main/assets/phi/context_ctx.onnx") for n in names)
    assert any(n.endswith("app/src/main/java/ai/phiedge/PhiedgeChat.kt") for n in names)
    # the first of android, cpu and ios (same recipe, provider and int4 settings) makes the export the other two
    # reuse; windows-dml has its own, and the two NPU targets share one (each compiled for its own chip)
    assert progress.count("reusing the export made for target android (") == 2 and "made for target cpu" not in progress
    assert progress.count("reusing the export made for target android-npu (") == 1  # snapdragon-npu: its own binaries


def test_two_runs_give_identical_bundles(first, checkpoints, tmp_path):
    """Rebuilt from scratch, the calibrated targets (android, and cpu, which shares its export) give the same
    bytes: their calibration, GPTQ and shared table are deterministic."""
    dist, shown, _ = first
    again = release(checkpoints["phi-4-mini"], ["android", "cpu"], tmp_path / "again", run_bench=False)
    assert [(b["file"], b["sha256"]) for b in again["bundles"]] == \
        [(b["file"], b["sha256"]) for b in shown["bundles"] if b["target"] in ("android", "cpu")]


def test_index_of_bundles_made_elsewhere(first, tmp_path):
    import shutil

    dist, shown, _ = first
    for b in shown["bundles"][:2]:
        shutil.copy(dist / b["file"], tmp_path / b["file"])
    made = index(tmp_path)
    assert [(b["target"], b["sha256"]) for b in made["bundles"]] == [(b["target"], b["sha256"])
                                                                      for b in shown["bundles"][:2]]
    assert (tmp_path / "RELEASE.md").is_file()
    with pytest.raises(PhiedgeError, match="no bundle archives"):
        index(tmp_path / "nothing")


def test_target_choice_is_required(runner, checkpoints):
    result = runner.invoke(cli, ["build", "--model", checkpoints["phi-4-mini"], "-o", "x"])
    assert result.exit_code == 2 and "--all-targets" in result.output
    empty = runner.invoke(cli, ["build", "--target", ",", "--model", checkpoints["phi-4-mini"], "-o", "x"])
    assert empty.exit_code == 2 and "names no target" in empty.output and "Traceback" not in empty.output
