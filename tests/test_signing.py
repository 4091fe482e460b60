"""Signed bundles: `package --sign`, `verify/run/bench --trust`, `keygen`, and minisign compatibility."""

import base64
import json
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from phiedge.bundle.package import MANIFEST, package, sha256
from phiedge.bundle.signing import (
    SIGNATURE,
    KeyFileError,
    SignatureError,
    check,
    keygen,
    load_public,
    load_secret,
    sign,
)
from phiedge.bundle.verify import safe_extract, verify
from phiedge.cli import cli

VECTORS = Path(__file__).parent / "data" / "minisign"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("keys")
    return {name: keygen(root / name) for name in ("release", "other")}


@pytest.fixture(scope="module")
def signed(builds, keys, tmp_path_factory) -> Path:
    """A bundle archive signed with the `release` key, packaged through the CLI."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("signed") / "b.zip"
    result = CliRunner().invoke(cli, ["package", str(builds("phi-4-mini", "int4")), "-o", str(out),
                                      "--sign", keys["release"]["secret_key"]])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["signed_by"] == keys["release"]["key_id"]
    return out


@pytest.fixture
def unpacked(signed, tmp_path) -> Path:
    return safe_extract(signed, tmp_path / "u")


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_signed_archive_and_folder_verify_with_the_right_key(signed, unpacked, keys, runner):
    for bundle in (signed, unpacked):
        report = verify(bundle, load=False, trust=keys["release"]["public_key"])
        assert report["signature"]["status"] == "verified"
        assert report["signature"]["key_id"] == keys["release"]["key_id"]
    result = runner.invoke(cli, ["verify", str(signed), "--no-load", "--trust", keys["release"]["public_key_line"]])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["signature"]["status"] == "verified"
    with zipfile.ZipFile(signed) as zf:  # beside the manifest, and not listed in it
        names = zf.namelist()
        top = names[0].split("/")[0]
        assert f"{top}/{SIGNATURE}" in names
        assert SIGNATURE not in json.loads(zf.read(f"{top}/{MANIFEST}"))["files"]
        assert keys["release"]["key_id"] in zf.read(f"{top}/README.md").decode()


def test_without_trust_a_signature_is_reported_not_checked(signed, builds, keys, tmp_path, runner):
    result = runner.invoke(cli, ["verify", str(signed), "--no-load"])
    assert result.exit_code == 0, result.output
    sig = json.loads(result.output)["signature"]
    assert sig["status"] == "not checked" and sig["key_id"] == keys["release"]["key_id"] and "--trust" in sig["note"]
    package(builds("phi-4-mini", "int4"), tmp_path / "plain.zip")
    assert verify(tmp_path / "plain.zip", load=False)["signature"] == {"status": "unsigned"}


def test_unsigned_bundle_is_refused_with_trust(builds, keys, tmp_path, runner):
    package(builds("phi-4-mini", "int4"), tmp_path / "plain.zip")
    result = runner.invoke(cli, ["verify", str(tmp_path / "plain.zip"), "--no-load",
                                 "--trust", keys["release"]["public_key"]])
    one_line_error(result, "not signed", keys["release"]["key_id"])


def test_bundle_signed_with_another_key_is_refused(signed, keys, runner):
    result = runner.invoke(cli, ["verify", str(signed), "--no-load", "--trust", keys["other"]["public_key"]])
    one_line_error(result, f"signed by key {keys['release']['key_id']}", f"trusted key {keys['other']['key_id']}")
    # the same through the environment variable
    result = runner.invoke(cli, ["verify", str(signed), "--no-load"],
                           env={"PHIEDGE_TRUST": keys["other"]["public_key"]})
    one_line_error(result, "not by the trusted key")


def test_files_changed_and_manifest_regenerated_after_signing_is_refused(unpacked, keys, runner):
    """The attack a bare manifest cannot catch: edit a file, rewrite its hash in the manifest."""
    target = unpacked / "generate.py"
    target.write_text(target.read_text() + "\nimport os  # something else\n")
    manifest = json.loads((unpacked / MANIFEST).read_text())
    manifest["files"]["generate.py"] = {"size": target.stat().st_size, "sha256": sha256(target)}
    (unpacked / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert verify(unpacked, load=False)["ok"]  # consistent: without a key this passes
    result = runner.invoke(cli, ["verify", str(unpacked), "--no-load", "--trust", keys["release"]["public_key"]])
    one_line_error(result, "manifest.json does not match its signature", "changed after signing")
    # re-signing with the attacker's own key does not help either
    attacker = load_secret(keys["other"]["secret_key"])
    (unpacked / SIGNATURE).write_bytes(sign((unpacked / MANIFEST).read_bytes(), attacker, "phiedge bundle x"))
    with pytest.raises(SignatureError, match="signed by key"):
        verify(unpacked, load=False, trust=keys["release"]["public_key"])


def signature_lines(root: Path) -> list[str]:
    return (root / SIGNATURE).read_text().splitlines()


@pytest.mark.parametrize("tamper, words", [
    ("flip", "does not match its signature"),
    ("comment", "trusted comment was altered"),
    ("garbage", "not a minisign signature"),
    ("empty", "not a minisign signature"),
])
def test_tampered_signature_file_is_refused(unpacked, keys, runner, tamper, words):
    lines = signature_lines(unpacked)
    if tamper == "flip":
        raw = bytearray(base64.b64decode(lines[1]))
        raw[-1] ^= 1
        lines[1] = base64.b64encode(bytes(raw)).decode()
    elif tamper == "comment":
        lines[2] = lines[2] + " (and more)"
    elif tamper == "garbage":
        lines = ["not", "a", "signature", "at all"]
    else:
        lines = []
    (unpacked / SIGNATURE).write_text("".join(line + "\n" for line in lines))
    result = runner.invoke(cli, ["verify", str(unpacked), "--no-load", "--trust", keys["release"]["public_key"]])
    one_line_error(result, words)


def test_only_the_signature_beside_the_manifest_is_allowed(unpacked, keys):
    """The extra-file check lets exactly one more file through, at the bundle's top."""
    shutil.copy(unpacked / SIGNATURE, unpacked / "model" / SIGNATURE)
    with pytest.raises(Exception, match=f"model/{SIGNATURE} is not in the manifest"):
        verify(unpacked, load=False, trust=keys["release"]["public_key"])


def test_malformed_and_wrong_keys_are_one_line(builds, keys, tmp_path, runner):
    bad = tmp_path / "bad.key"
    bad.write_text("untrusted comment: nothing\nnot base64 at all!\n")
    short = tmp_path / "short.pub"
    short.write_text("untrusted comment: x\n" + base64.b64encode(b"Ed1234").decode() + "\n")
    encrypted = tmp_path / "encrypted.key"
    raw = bytearray(base64.b64decode((VECTORS / "test.key").read_text().splitlines()[1]))
    raw[2:4] = b"Sc"
    encrypted.write_text("untrusted comment: x\n" + base64.b64encode(bytes(raw)).decode() + "\n")
    model = str(builds("phi-4-mini", "int4"))
    out = tmp_path / "b.zip"
    cases = [
        (["package", model, "-o", str(out), "--sign", str(tmp_path / "missing.key")], "no such secret key file"),
        (["package", model, "-o", str(out), "--sign", str(bad)], "not base64"),
        (["package", model, "-o", str(out), "--sign", str(tmp_path)], "is a folder"),
        (["package", model, "-o", str(out), "--sign", keys["release"]["public_key"]], "is a public key"),
        (["package", model, "-o", str(out), "--sign", str(encrypted)], "password-protected"),
        (["verify", model, "--trust", str(short)], "not a minisign public key"),
        (["verify", model, "--trust", keys["release"]["secret_key"]], "is a secret key"),
        (["verify", model, "--trust", "RWnotakey"], "no such public key file"),
        (["run", model, "--trust", str(bad), "--prompt", "hi"], "not base64"),
    ]
    for args, words in cases:
        one_line_error(runner.invoke(cli, args), words)
        assert not out.exists() and not list(tmp_path.glob(".b.zip*"))  # nothing half-written


def test_damaged_secret_key_is_refused(keys, tmp_path):
    lines = Path(keys["release"]["secret_key"]).read_text().splitlines()
    raw = bytearray(base64.b64decode(lines[1]))
    raw[100] ^= 1  # inside the public half of the 64-byte secret
    damaged = tmp_path / "damaged.key"
    damaged.write_text(lines[0] + "\n" + base64.b64encode(bytes(raw)).decode() + "\n")
    with pytest.raises(KeyFileError, match="do not belong together"):
        load_secret(damaged)


def test_signed_archive_is_byte_reproducible(builds, keys, tmp_path):
    key = load_secret(keys["release"]["secret_key"])
    model = builds("phi-4-mini", "int4")
    package(model, tmp_path / "a.zip", sign=key)
    package(model, tmp_path / "b.zip", sign=key)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_run_with_trust_refuses_an_unsigned_bundle(builds, keys, tmp_path, runner):
    package(builds("phi-4-mini", "int4"), tmp_path / "plain.zip")
    trust = ["--trust", keys["release"]["public_key"]]
    one_line_error(runner.invoke(cli, ["run", str(tmp_path / "plain.zip"), *trust, "--prompt", "hi"]), "not signed")
    # a bare model folder carries no signature at all
    one_line_error(runner.invoke(cli, ["run", str(builds("phi-4-mini", "int4")), *trust, "--prompt", "hi"]),
                   "nothing signed")


def test_bench_with_trust_refuses_an_unsigned_bundle(builds, keys, tmp_path, runner):
    package(builds("phi-4-mini", "int4"), tmp_path / "plain.zip")
    args = ["bench", str(tmp_path / "plain.zip"), "--trust", keys["release"]["public_key"], "-p", "8", "-n", "1",
            "-r", "1", "--warmup", "0"]
    one_line_error(runner.invoke(cli, args), "not signed")


def test_run_with_trust_runs_a_signed_bundle(signed, keys, runner):
    result = runner.invoke(cli, ["run", str(signed), "--trust", keys["release"]["public_key"],
                                 "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(tmp_path, runner):
    result = runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k" / "release")])
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    secret, public = Path(made["secret_key"]), Path(made["public_key"])
    assert secret.name == "release.key" and public.name == "release.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_public(public).id == made["key_id"] == load_secret(secret).id == load_public(public.read_text()).id
    assert load_public(made["public_key_line"]).key.public_bytes_raw() == load_public(public).key.public_bytes_raw()
    before = secret.read_bytes()
    one_line_error(runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k" / "release.key")]), "already exists")
    assert secret.read_bytes() == before
    assert runner.invoke(cli, ["keygen", "-o", str(tmp_path / "k" / "release"), "--force"]).exit_code == 0
    assert secret.read_bytes() != before


def test_reads_and_writes_what_the_reference_minisign_does():
    """tests/data/minisign was made by minisign 0.11 itself (see its README): same key, same bytes out."""
    data = (VECTORS / "message.json").read_bytes()
    theirs = (VECTORS / "message.json.minisig").read_bytes()
    key, public = load_secret(VECTORS / "test.key"), load_public(VECTORS / "test.pub")
    assert key.id == public.id == "52C705E1E8FE3AF4"
    assert check(data, theirs, public, "message.json", "sig") == "phiedge test vector"
    assert sign(data, key, "phiedge test vector", "signature from minisign secret key") == theirs
    with pytest.raises(SignatureError, match="does not match"):
        check(data + b" ", theirs, public, "message.json", "sig")


@pytest.mark.skipif(shutil.which("minisign") is None, reason="the minisign program is not installed")
def test_minisign_verifies_a_signed_bundle(unpacked, keys):
    result = subprocess.run(["minisign", "-Vm", str(unpacked / MANIFEST), "-p", keys["release"]["public_key"]],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
    (unpacked / MANIFEST).write_bytes((unpacked / MANIFEST).read_bytes() + b" ")
    result = subprocess.run(["minisign", "-Vm", str(unpacked / MANIFEST), "-p", keys["release"]["public_key"]],
                            capture_output=True, text=True)
    assert result.returncode != 0


def test_signature_covers_the_manifest_bytes_exactly(signed, keys):
    """The signature is of manifest.json as stored, not of a re-serialised copy."""
    with zipfile.ZipFile(signed) as zf:
        top = zf.namelist()[0].split("/")[0]
        manifest, blob = zf.read(f"{top}/{MANIFEST}"), zf.read(f"{top}/{SIGNATURE}")
    public = load_public(keys["release"]["public_key"])
    check(manifest, blob, public, MANIFEST, SIGNATURE)
    reserialised = json.dumps(json.loads(manifest)).encode()  # same content, other bytes
    assert reserialised != manifest
    with pytest.raises(SignatureError):
        check(reserialised, blob, public, MANIFEST, SIGNATURE)
