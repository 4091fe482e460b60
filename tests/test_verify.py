import os
import shutil
import zipfile

import pytest

from phiedge.bundle.package import package
from phiedge.bundle.verify import BundleError, safe_extract, verify
from phiedge.cli import cli


@pytest.fixture
def unpacked(builds, tmp_path):
    archive = tmp_path / "b.zip"
    package(builds("phi-4-mini", "int4"), archive)
    return safe_extract(archive, tmp_path / "u")


def test_intact_folder_verifies(unpacked):
    assert verify(unpacked)["ok"]


def test_one_altered_byte_is_named(unpacked):
    data = unpacked / "model" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model/model.onnx.data does not match its SHA-256"):
        verify(unpacked)


def test_truncation_is_named(unpacked):
    data = unpacked / "model" / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 100)
    with pytest.raises(BundleError, match="model/model.onnx.data is .* bytes.*truncated"):
        verify(unpacked)


def test_missing_genai_config_is_named(unpacked, runner):
    (unpacked / "model" / "genai_config.json").unlink()
    result = runner.invoke(cli, ["verify", str(unpacked)])
    assert result.exit_code == 1 and "model/genai_config.json is missing" in result.output
    assert "Traceback" not in result.output


def test_extra_file_is_named(unpacked):
    (unpacked / "model" / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="model/notes.txt is not in the manifest"):
        verify(unpacked)


def test_too_old_runtime_is_refused(unpacked, monkeypatch):
    from phiedge.bundle import verify as verify_mod

    monkeypatch.setattr(verify_mod, "runtime_version", lambda: "0.13.0")
    with pytest.raises(BundleError, match="0.13.0 is older than 0.14.1"):
        verify(unpacked, load=False)


@pytest.mark.parametrize("name, words", [("../evil.txt", "leaves the bundle"), ("/etc/evil.txt", "absolute path"),
                                         ("b/../../evil.txt", "leaves the bundle"), ("C:evil.txt", "Windows drive"),
                                         ("C:\\evil.txt", "Windows drive"), ("b/evil.txt:stream", "Windows drive"),
                                         (".", "without a name"), ("./", "without a name"), ("", "without a name")])
def test_unsafe_archive_paths_are_refused(tmp_path, runner, name, words):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("b/manifest.json", "{}")
        with zf.open(zipfile.ZipInfo(name), "w") as f:  # writestr cannot write an empty name
            f.write(b"x")
    with pytest.raises(BundleError, match=words):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()
    result = runner.invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 1 and words in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_symbolic_link_entries_are_refused(tmp_path, runner):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("b/manifest.json", "{}")
        link = zipfile.ZipInfo("b/model/model.onnx.data")
        link.external_attr = 0o120777 << 16  # what `zip --symlinks` writes: the target is the entry's content
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(BundleError, match="refusing symbolic link 'b/model/model.onnx.data'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = runner.invoke(cli, ["verify", str(archive)])
    assert result.exit_code == 1 and "symbolic link" in result.output and len(result.output.strip().splitlines()) == 1


def test_not_a_bundle(tmp_path, runner):
    (tmp_path / "f.zip").write_text("not a zip")
    assert "not a readable zip" in runner.invoke(cli, ["verify", str(tmp_path / "f.zip")]).output
    result = runner.invoke(cli, ["run", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 1 and "neither a phiedge bundle nor a model folder" in result.output


def test_run_a_model_folder_directly(builds, runner, tmp_path):
    shutil.copytree(builds("phi-4-mini", "int4"), tmp_path / "m")
    result = runner.invoke(cli, ["run", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def bundle_dir(builds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prop")
    package(builds("phi-4-mini", "int4"), tmp / "b.zip")
    return safe_extract(tmp / "b.zip", tmp / "u")


def test_lying_manifest_paths_are_refused(bundle_dir):
    import json

    path = bundle_dir / "manifest.json"
    original = path.read_text()
    try:
        for lie in [{"model_dir": "../../etc"}, {"files": {"../outside": {"size": 1, "sha256": "x"}}},
                    {"files": {"/etc/passwd": {"size": 1, "sha256": "x"}}}]:
            path.write_text(json.dumps({**json.loads(original), **lie}))
            with pytest.raises(BundleError, match="leaves the bundle"):
                verify(bundle_dir, load=False)
    finally:
        path.write_text(original)


@pytest.mark.parametrize("field, lie, words", [
    ("size", lambda v: v + 1, r"model/model.onnx.data is \d+ bytes, the manifest says \d+"),
    ("sha256", lambda v: "0" * 64, "model/model.onnx.data does not match its SHA-256"),
])
def test_lying_manifest_contents_are_named(bundle_dir, field, lie, words):
    """The file is intact; the manifest's record of it was edited."""
    import json

    path = bundle_dir / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    entry = manifest["files"]["model/model.onnx.data"]
    entry[field] = lie(entry[field])
    try:
        path.write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=words):
            verify(bundle_dir, load=False)
    finally:
        path.write_text(original)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10)
FIELDS = ["format", "files", "min_runtime", "model_dir", "checks", "name", "model"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3), st.sets(st.sampled_from(FIELDS), max_size=2))
def test_manifest_reader_never_crashes(bundle_dir, changes, dropped):
    """Any manifest: the bundle verifies or one BundleError names the problem; nothing else escapes."""
    import json

    path = bundle_dir / "manifest.json"
    original = path.read_text()
    manifest = {k: v for k, v in json.loads(original).items() if k not in dropped}
    try:
        path.write_text(json.dumps({**manifest, **changes}))
        try:
            verify(bundle_dir, load=False)
        except BundleError as exc:
            assert str(exc)
    finally:
        path.write_text(original)
