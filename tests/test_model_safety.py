"""A bundle or model folder asking the runtime for more than phiedge writes is refused before anything loads.

Each attack reseals the manifest (sizes and SHA-256 recomputed), so only the new checks can catch it.
"""

import json
import re
import shutil
import subprocess
import zipfile

import onnx
import pytest

from phiedge.bundle.model_safety import UnsafeModelError, check_model_folder
from phiedge.bundle.package import MANIFEST, package, sha256
from phiedge.bundle.smoke import smoke_generate
from phiedge.bundle.verify import safe_extract, verify
from phiedge.cli import cli

LIBRARY = r"""
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void ran(void) {
    const char *marker = getenv("PHIEDGE_TEST_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("the bundle's library ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def archive(builds, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "b.zip"
    package(builds("phi-4-mini", "int4"), out)
    return out


@pytest.fixture
def bundle(archive, tmp_path):
    return safe_extract(archive, tmp_path / "u")


@pytest.fixture
def loads(monkeypatch):
    """Every attempt to open a model in onnxruntime-genai, which fails: the tests want none."""
    import onnxruntime_genai as og

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("onnxruntime-genai was asked to load the model")

    monkeypatch.setattr(og, "Config", refuse)
    monkeypatch.setattr(og, "Model", refuse)
    return calls


def reseal(root, *rels):
    """Record the files' present size and SHA-256 in the manifest (a file gone: its entry goes), as the
    maker of a hostile bundle would."""
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    for rel in rels:
        if (root / rel).is_file():
            manifest["files"][rel] = {"size": (root / rel).stat().st_size, "sha256": sha256(root / rel)}
        else:
            manifest["files"].pop(rel)
    path.write_text(json.dumps(manifest, indent=2))


def edit_config(model_dir, change, root=None):
    """Apply change to genai_config.json; reseal the bundle at root, if any."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=4))
    if root is not None:
        reseal(root, path.relative_to(root).as_posix())


def session_options(config):
    return config["model"]["decoder"]["session_options"]


def shared_library(path, tmp_path):
    """A library whose constructor writes $PHIEDGE_TEST_MARKER when loaded; any bytes without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        path.write_bytes(b"\x7fELF (no compiler here: not a real library)")
        return False
    (tmp_path / "lib.c").write_text(LIBRARY)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(path), str(tmp_path / "lib.c")], check=True)
    return True


def one_line_error(result, words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert words in result.output, result.output


def custom_ops_bundle(bundle, tmp_path, monkeypatch):
    """The reproduced attack: a library shipped in the bundle, named as custom_ops_library, all hashed."""
    marker = tmp_path / "marker"
    monkeypatch.setenv("PHIEDGE_TEST_MARKER", str(marker))
    shared_library(bundle / "model" / "libcustom_ops.so", tmp_path)
    reseal(bundle, "model/libcustom_ops.so")
    edit_config(bundle / "model", lambda c: session_options(c).update(custom_ops_library="libcustom_ops.so"), bundle)
    return marker


@pytest.mark.parametrize("command", [["verify"], ["verify", "--no-load"], ["run", "--prompt", "hi"],
                                     ["bench", "-p", "4", "-n", "1", "-r", "1", "--warmup", "0"]])
def test_custom_ops_library_never_runs(bundle, tmp_path, monkeypatch, runner, command):
    marker = custom_ops_bundle(bundle, tmp_path, monkeypatch)
    args = [command[0], str(bundle), *command[1:]]
    result = runner.invoke(cli, args)
    assert not marker.exists(), "the bundle's native library was loaded"
    one_line_error(result, "model.decoder.session_options.custom_ops_library is not a setting")


def test_custom_ops_library_in_an_archive_never_runs(bundle, tmp_path, monkeypatch, runner):
    marker = custom_ops_bundle(bundle, tmp_path, monkeypatch)
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(bundle.rglob("*")):
            zf.write(path, path.relative_to(bundle.parent).as_posix())
    result = runner.invoke(cli, ["verify", str(archive)])
    assert not marker.exists(), "the bundle's native library was loaded"
    one_line_error(result, "custom_ops_library is not a setting")


@pytest.mark.parametrize("options, words", [
    ([{"qnn": {"backend_path": "libQnnHtp.so"}}], "provider_options names 'qnn'"),
    ([{"dml": {}}], "provider_options names 'dml'; the target's provider (cpu) allows none"),
])
def test_a_provider_the_target_does_not_name_is_refused(bundle, loads, options, words):
    edit_config(bundle / "model", lambda c: session_options(c).update(provider_options=options), bundle)
    with pytest.raises(UnsafeModelError, match=re.escape(words)):
        verify(bundle)
    assert loads == []


def test_provider_options_and_unknown_providers_are_refused(bundle, loads):
    edit_config(bundle / "model", lambda c: session_options(c).update(provider_options=[{"dml": {"x": "1"}}]), bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "execution_provider": "dml"}))
    with pytest.raises(UnsafeModelError, match=re.escape("provider_options.dml sets x ('1'), which phiedge never")):
        verify(bundle)
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "execution_provider": "openvino"}))
    with pytest.raises(UnsafeModelError, match="execution provider 'openvino' is not one phiedge builds for"):
        verify(bundle)
    assert loads == []


@pytest.mark.parametrize("settings, refused", [
    ({"backend_path": "/tmp/libQnnHtp.so"}, "backend_path ('/tmp/libQnnHtp.so')"),  # a library the bundle names
    ({"backend_type": "gpu"}, "backend_type ('gpu')"),
    ({"backend_type": "htp", "htp_arch": "73", "soc_model": "60", "profiling_file_path": "/etc/x"},
     "profiling_file_path"),
    ({"backend_type": "htp", "htp_arch": "73", "soc_model": "60"}, None),  # what phiedge writes for the NPU
])
def test_the_npu_provider_takes_only_the_options_phiedge_writes(bundle, loads, settings, refused):
    """QNN's provider options can name a backend library to load: a bundle may only pick the installed provider's
    HTP backend by type and the chip its context binaries are for."""
    edit_config(bundle / "model", lambda c: session_options(c).update(provider_options=[{"qnn": settings}]), bundle)
    if refused is None:
        check_model_folder(bundle / "model", "qnn")
        return
    with pytest.raises(UnsafeModelError, match=re.escape(f"provider_options.qnn sets {refused}")):
        check_model_folder(bundle / "model", "qnn")
    assert loads == []


@pytest.mark.parametrize("where", ["bundle root", "absolute"])
def test_a_decoder_file_outside_the_model_folder_is_refused(bundle, tmp_path, loads, where):
    """The model (and its data) copied where the filename points: without the check it would load."""
    target = bundle if where == "bundle root" else tmp_path / "elsewhere"
    target.mkdir(exist_ok=True)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(bundle / "model" / name, target / name)
    if where == "bundle root":
        reseal(bundle, "model.onnx", "model.onnx.data")
    filename = "../model.onnx" if where == "bundle root" else str(target / "model.onnx")
    edit_config(bundle / "model", lambda c: c["model"]["decoder"].update(filename=filename), bundle)
    with pytest.raises(UnsafeModelError, match=re.escape(f"model.decoder.filename '{filename}' is not a file inside")):
        verify(bundle)
    assert loads == []


@pytest.mark.parametrize("where", ["../x", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(bundle, tmp_path, loads, where):
    """The weights moved where the ONNX file points: without the check the model would load from there."""
    model_dir = bundle / "model"
    data = model_dir / "model.onnx.data"
    if where == "symlink":  # the location is a plain name, but the file is a link leaving the folder
        shutil.move(data, tmp_path / "outside.data")
        data.symlink_to(tmp_path / "outside.data")
        words = "model.onnx.data links outside the model folder"
    else:
        location = "../x" if where == "../x" else str(tmp_path / "outside.data")
        shutil.move(data, model_dir / location)
        model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (model_dir / "model.onnx").write_bytes(model.SerializeToString())
        reseal(bundle, "model/model.onnx", "model/model.onnx.data", *(["x"] if where == "../x" else []))
        words = f"keeps its data at '{location}', outside the model folder"
    with pytest.raises(UnsafeModelError, match=re.escape(words)):
        verify(bundle)
    assert loads == []


@pytest.fixture
def hostile_folder(builds, tmp_path):
    """A plain model folder (no manifest) naming a custom ops library."""
    folder = tmp_path / "m"
    shutil.copytree(builds("phi-4-mini", "int4"), folder)
    shared_library(folder / "libcustom_ops.so", tmp_path)
    edit_config(folder, lambda c: session_options(c).update(custom_ops_library="libcustom_ops.so"))
    return folder


@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["bench", "-p", "4", "-n", "1", "-r", "1"],
                                     ["validate", "--reference", None]])
def test_a_plain_model_folder_is_checked_too(hostile_folder, checkpoints, runner, loads, command):
    args = [command[0], str(hostile_folder), *[a or checkpoints["phi-4-mini"] for a in command[1:]]]
    one_line_error(runner.invoke(cli, args), "custom_ops_library is not a setting phiedge writes")
    assert loads == []


def test_builds_smoke_check_refuses_before_loading(hostile_folder, loads):
    with pytest.raises(UnsafeModelError, match="custom_ops_library"):
        smoke_generate(hostile_folder)
    assert loads == []


def test_what_phiedge_builds_passes(builds):
    check_model_folder(builds("phi-4-mini", "int4"))
    check_model_folder(builds("phi-4-mini", "int4"), "cpu")


@pytest.mark.parametrize("config, words", [
    ("{", "is missing or not JSON"),
    ('{"model": {"decoder": {"filename": 5}}}', "model.decoder.filename: Input should be a valid string"),
    ('{"model": {"embedding": {"filename": "e.onnx"}}}', "model.embedding is not a setting phiedge writes"),
    ('{"model": {"decoder": {"filename": "C:model.onnx"}}}', "model.decoder.filename 'C:model.onnx' is not a file"),
])
def test_odd_configs_are_one_line(tmp_path, config, words):
    (tmp_path / "genai_config.json").write_text(config)
    with pytest.raises(UnsafeModelError, match=words):
        check_model_folder(tmp_path)
