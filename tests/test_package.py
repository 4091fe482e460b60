import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from phiedge import catalog
from phiedge.bundle.package import PackageError, package
from phiedge.bundle.verify import safe_extract
from phiedge.cli import cli


@pytest.fixture(scope="module")
def bundle(builds, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b.zip"
    package(builds("phi-4-mini", "int4"), out)
    return out


def test_packaging_twice_gives_identical_archives(builds, bundle, tmp_path):
    again = tmp_path / "again.zip"
    package(builds("phi-4-mini", "int4"), again)
    assert again.read_bytes() == bundle.read_bytes()


def test_manifest_lists_every_file_and_the_build(bundle, builds, checkpoints):
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        root = names[0].split("/")[0]
        manifest = json.loads(zf.read(f"{root}/manifest.json"))
    assert root == manifest["name"] == "phi-4-mini-synth-int4-cpu-phiedge0.1.0"
    assert {f"{root}/{f}" for f in manifest["files"]} | {f"{root}/manifest.json"} == set(names)
    for needed in ("model/model.onnx", "model/model.onnx.data", "model/genai_config.json", "model/tokenizer.json",
                   "generate.py", "README.md", "requirements.txt"):
        assert needed in manifest["files"]
    synth_record = json.loads((Path(checkpoints["phi-4-mini"]) / "phiedge_synth.json").read_text())
    assert manifest["model"]["params"] == synth_record["params"]
    assert manifest["model"]["shape"]["head_dim"] == 128 and manifest["model"]["int4"]["block_size"] == 128
    assert manifest["context_cap"] == 4096 and manifest["min_runtime"]["onnxruntime-genai"] == "0.14.1"
    assert manifest["versions"]["olive-ai"] == "0.13.0"
    # the build's own validation report, number for number, and its verdict (random weights: none at int4)
    report = json.loads((builds("phi-4-mini", "int4") / "validation.json").read_text())
    metrics = {k: v for k, v in report["metrics"].items() if k != "prompts"}
    assert manifest["validation"] == {**metrics, "passed": True, "enforced": False, "note": report["note"],
                                      "dequantized": report["dequantized"]}  # passed on the dequantized check
    assert report["note"].startswith("random-weight reference")
    assert metrics["positions"] == 2047 and metrics["kl_max"] >= metrics["kl_p99"] and 0 <= metrics["top1"] <= 1


def minimal_env(tmp_path: Path) -> Path:
    """A path holding only onnxruntime-genai, onnxruntime and numpy: phiedge cannot be imported."""
    site, env = Path(sysconfig.get_paths()["purelib"]), tmp_path / "env"
    env.mkdir()
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0] in ("onnxruntime_genai", "onnxruntime", "numpy"):
            (env / entry.name).symlink_to(entry)
    return env


def test_bundled_program_runs_without_phiedge(bundle, tmp_path):
    root = safe_extract(bundle, tmp_path / "unpacked")
    env = {"PYTHONPATH": str(minimal_env(tmp_path)), "PATH": "/usr/bin:/bin"}
    check = subprocess.run([sys.executable, "-S", "-c", "import phiedge"], env=env, capture_output=True, text=True)
    assert "No module named 'phiedge'" in check.stderr
    result = subprocess.run([sys.executable, "-S", "generate.py", "model", "--prompt", "Hi", "--max-new-tokens", "6"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "6 new tokens" in result.stderr


def test_verify_and_run_an_archive(runner, bundle):
    result = runner.invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    ran = runner.invoke(cli, ["run", str(bundle), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert ran.exit_code == 0, ran.output


def test_only_built_folders_are_packaged(tmp_path, checkpoints):
    with pytest.raises(PackageError, match="not a folder written by"):
        package(checkpoints["phi-4-mini"], tmp_path / "x.zip")
    assert list(tmp_path.iterdir()) == []


LAYOUT_FILES = {
    "android": ["app/src/main/assets/phi/model.onnx", "app/src/main/assets/phi/genai_config.json",
                "app/src/main/assets/phi/tokenizer.json", "app/src/main/java/ai/phiedge/PhiedgeChat.kt"],
    "ios": ["Resources/phi/model.onnx", "Resources/phi/model.onnx.data", "Resources/phi/tokenizer.json",
            "Sources/PhiedgeChat.swift"],
    "windows-dml": ["model/model.onnx", "model/genai_config.json", "run.ps1", "generate.py"],
}


@pytest.mark.parametrize("target", ["android", "ios", "windows-dml"])
def test_platform_bundles_have_their_layout_and_verify(runner, builds, tmp_path, target):
    # the phone targets are built from the trained model, on which their int4 thresholds mean something
    built = builds("phi-4-mini" if target == "windows-dml" else "trained", "int4", target)
    archive = tmp_path / f"{target}.zip"
    result = runner.invoke(cli, ["package", str(built), "-o", str(archive)])
    assert result.exit_code == 0, result.output
    root = safe_extract(archive, tmp_path / "x")
    for rel in LAYOUT_FILES[target] + ["README.md", "requirements.txt", "manifest.json"]:
        assert (root / rel).is_file(), rel
    manifest = json.loads((root / "manifest.json").read_text())
    verified = runner.invoke(cli, ["verify", str(archive)])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    if target == "windows-dml":
        assert manifest["validation"] is None and manifest["checks"]["numeric_validation"] is False
        assert "dml is not available on this machine" in manifest["checks"]["not_run_here"]
        assert manifest["checks"]["graph"]["provider"] == "DmlExecutionProvider"
        assert report["loaded"] is False and report["graph_checked_for"] == "DmlExecutionProvider"
        runtime = manifest["versions"]["onnxruntime-genai"]  # the DirectML wheel is not installed here: genai's version
        assert (root / "requirements.txt").read_text() == f"onnxruntime-genai-directml>={runtime}\n"
        assert "not validated numerically" in (root / "README.md").read_text()
    else:
        assert manifest["checks"]["numeric_validation"] is True
        validation = json.loads((built / "validation.json").read_text())
        assert validation["target"] == target and validation["thresholds"] == \
            catalog.find_target(target).validation.thresholds["int4"].model_dump()
        assert manifest["validation"]["enforced"] is True and manifest["validation"]["passed"] is True
        assert "(thresholds met)" in (root / "README.md").read_text()
        assert report["loaded"] is True and manifest["checks"]["graph"]["provider"] == "CPUExecutionProvider"
        assert manifest["context_cap"] == 2048 and manifest["checks"]["memory"]["fits"] is True


def test_package_into_a_folder_names_the_archive(runner, builds, tmp_path):
    result = runner.invoke(cli, ["package", str(builds("phi-4-mini", "int4")), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["archive"]
    assert written == str(tmp_path / "phi-4-mini-synth-int4-cpu-phiedge0.1.0.zip") and Path(written).is_file()
    # a folder that does not exist yet, named with a trailing slash (as in `-o dist/`), is made
    result = runner.invoke(cli, ["package", str(builds("phi-4-mini", "int4")), "-o", str(tmp_path / "dist") + "/"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dist" / "phi-4-mini-synth-int4-cpu-phiedge0.1.0.zip").is_file()


def test_full_disk_is_one_line_and_leaves_no_archive(runner, builds, full_disk):
    built = builds("phi-4-mini", "int4")
    assert sum(p.stat().st_size for p in built.iterdir()) > 2 << 20  # more than the 1 MiB disk holds
    result = runner.invoke(cli, ["package", str(built), "-o", str(full_disk / "b.zip")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"Error: writing {full_disk / 'b.zip'} failed: the disk is full"], result.output
    assert list(full_disk.iterdir()) == []  # no partial archive, no lock file
