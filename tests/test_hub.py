"""Checkpoints by hub id, against a hub served on 127.0.0.1 (hubserver.py): phiedge runs as a user runs it, in
its own process with HF_ENDPOINT pointed at the server and HF_HOME in the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
from hubserver import Hub, Server

from phiedge.build.plan import BuildOptions, plan
from phiedge.bundle.package import package
from phiedge.checkpoints import hub as hub_module

REPO = "microsoft/Phi-4-mini-instruct"  # the catalog's hub id for phi-4-mini, served by the local hub
NOT_FETCHED = {"pytorch_model.bin": b"pickled weights", "onnx/model.onnx": b"not ours",
               "modeling_phi3.py": b"raise SystemExit('remote code ran')\n"}


def phiedge(args, env, timeout=300, wait=True):
    cmd = [sys.executable, "-c", "from phiedge.cli import cli; cli()", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def environment(url: str, home: Path, offline: bool = False, token: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30")
    if token:
        env["HF_TOKEN"] = token
    return env


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def served(checkpoints):
    hub = Hub()
    commit = hub.add(REPO, Path(checkpoints["phi-4-mini"]), extra=NOT_FETCHED, tags=("v1",))
    hub.add("someone/gated-phi", Path(checkpoints["phi-4-mini"]), token="hf_secret")
    with Server(hub) as url:
        yield hub, url, commit


def test_a_catalog_name_is_fetched_by_its_hub_id_without_what_a_build_does_not_read(served, tmp_path):
    hub, url, commit = served
    out = tmp_path / "phi"
    result = phiedge(["fetch", "phi-4-mini", "-o", str(out), "--revision", "v1"], environment(url, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"repo_id": REPO, "revision": "v1", "commit": commit}
    fetched = {p.name for p in out.iterdir() if p.is_file()}
    wanted = {f for f in hub.repos[REPO].files if "/" not in f and any(fnmatch(f, p) for p in hub_module.FILES)}
    assert fetched == wanted | {hub_module.ORIGIN} and "model.safetensors" in wanted and "config.json" in wanted
    asked = {path for method, path, _ in hub.log if method == "GET"}
    assert not any(name in path for path in asked for name in NOT_FETCHED)  # never even requested
    assert hub_module.origin(out).commit == commit


def test_a_fetched_folder_names_its_commit_to_the_build(served, tmp_path):
    """The origin a build records (its record and manifest: the hub-id build test below) is read from the folder."""
    hub, url, commit = served
    env, folder = environment(url, tmp_path / "hf"), tmp_path / "phi"
    assert phiedge(["fetch", REPO, "--revision", "v1", "-o", str(folder)], env).returncode == 0
    checkpoint = plan(folder, "cpu", BuildOptions(precision="fp32")).checkpoint
    assert checkpoint.origin.model_dump() == {"repo_id": REPO, "revision": "v1", "commit": commit}
    assert checkpoint.name == "Phi-4-mini-instruct"  # bundles are named after the repository
    offline = phiedge(["fetch", "microsoft/phi-2", "-o", str(tmp_path / "p2")], environment(url, tmp_path / "hf", True))
    assert "microsoft/phi-2 is not in the Hugging Face cache" in one_line_error(offline)


def test_hub_errors_are_one_line(served, checkpoints, tmp_path):
    hub, url, _ = served
    moe = tmp_path / "moe"
    shutil.copytree(checkpoints["phi-4-mini"], moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "architectures": ["PhiMoEForCausalLM"]}))
    hub.add("someone/phi-moe", moe)
    env = environment(url, tmp_path / "hf")
    unknown = phiedge(["fetch", "nobody/no-such-phi", "-o", str(tmp_path / "a")], env)
    assert "nobody/no-such-phi: no such repository" in one_line_error(unknown)
    gated = phiedge(["fetch", "someone/gated-phi", "-o", str(tmp_path / "b")], env)
    assert "is gated" in one_line_error(gated) and "HF_TOKEN" in one_line_error(gated)
    revision = phiedge(["fetch", REPO, "--revision", "v9", "-o", str(tmp_path / "c")], env)
    assert "has no revision 'v9'" in one_line_error(revision)
    opened = phiedge(["fetch", "someone/gated-phi", "-o", str(tmp_path / "d")],
                     environment(url, tmp_path / "hf", token="hf_secret"))
    assert opened.returncode == 0, opened.stderr
    folder = phiedge(["fetch", str(tmp_path / "d"), "-o", str(tmp_path / "e")], env)
    assert "neither a hub id" in one_line_error(folder)
    typo = phiedge(["build", "--model", "out/my--ckpt", "--target", "cpu", "--dry-run", "-q"], env)  # not a valid hub id
    assert "model folder out/my--ckpt does not exist" in one_line_error(typo)
    # config.json first: an architecture phiedge cannot build is refused before any weight is fetched
    moe = phiedge(["build", "--model", "someone/phi-moe", "--target", "cpu", "-q", "-o", str(tmp_path / "f")], env)
    assert one_line_error(moe).startswith("Error: someone/phi-moe: PhiMoEForCausalLM (phi-3.5-moe) cannot be built")
    assert not [path for _, path, _ in hub.log if "phi-moe" in path and path.endswith(".safetensors")]


def test_build_takes_a_hub_id_into_the_cache_and_reuses_it_offline(served, tmp_path):
    """`build --model ID --revision`: fetched into HF_HOME's cache (not into a folder of the user's), the commit
    in the record; offline, the same id and the catalog name plan from the cache (huggingface_hub knows the
    snapshot by the revision it was fetched at); one line for what is not in it."""
    hub, url, commit = served
    home = tmp_path / "hf"
    args = ["--target", "cpu", "--precision", "fp32", "--no-validate", "-q"]
    online = phiedge(["build", "--model", REPO, "--revision", "v1", *args, "-o", str(tmp_path / "a")],
                     environment(url, home))
    assert online.returncode == 0, online.stderr
    source = json.loads((tmp_path / "a" / "phiedge_build.json").read_text())["source"]
    assert source["hub"] == {"repo_id": REPO, "revision": "v1", "commit": commit}
    assert source["name"] == "Phi-4-mini-instruct"
    assert (home / "hub" / "models--microsoft--Phi-4-mini-instruct" / "snapshots" / commit / "config.json").is_file()
    manifest = package(tmp_path / "a", tmp_path / "bundle.zip")
    assert manifest["model"]["hub"]["commit"] == commit and manifest["name"].startswith("Phi-4-mini-instruct")
    assert not any(name in path for _, path, _ in hub.log for name in NOT_FETCHED)
    served_before = len(hub.log)
    offline = environment(url, home, offline=True)
    # offline the cache knows the snapshot as v1, not main: validate finds it by the build's commit
    checked = phiedge(["validate", str(tmp_path / "a"), "--reference", REPO], offline)
    assert checked.returncode == 0 and "PASS" in checked.stdout, checked.stdout + checked.stderr
    for model in (REPO, "phi-4-mini"):  # --dry-run: the plan resolves the checkpoint as a build does
        again = phiedge(["build", "--model", model, "--revision", "v1", "--target", "cpu", "--precision", "fp32",
                         "--dry-run"], offline)
        assert again.returncode == 0, again.stderr
        assert commit in json.loads(again.stdout)["input_model"]["model_path"]
    assert len(hub.log) == served_before  # offline means no request at all
    missing = phiedge(["build", "--model", "microsoft/phi-2", *args, "-o", str(tmp_path / "b")], offline)
    line = one_line_error(missing)
    assert "microsoft/phi-2 is not in the Hugging Face cache" in line and "no folder microsoft/phi-2 here" in line
    assert not (tmp_path / "b").exists()
    folder = phiedge(["build", "--model", str(tmp_path / "a"), "--revision", "v1", *args, "-o", str(tmp_path / "c")],
                     offline)
    assert "is a folder: --revision (v1) is for a hub id" in one_line_error(folder)


def test_a_cut_off_download_resumes_where_it_stopped(tmp_path):
    """A fetch killed in the middle of a file leaves its first 10 MB (huggingface_hub's write chunk); the next
    fetch asks the hub for the rest only (Range) and the file is whole."""
    from phiedge.checkpoints.synth import Shrink, synth

    wide = Path(synth("phi-4-mini", tmp_path / "wide", Shrink(layers=1, heads=3, kv_heads=1, intermediate=256,
                                                              vocab=32768), seed=3)["path"])
    weights = (wide / "model.safetensors").read_bytes()
    assert len(weights) // 2 > 10 * 2**20
    hub = Hub(stall="model.safetensors")
    hub.add(REPO, wide)
    out, env = tmp_path / "phi", None
    with Server(hub) as url:
        env = environment(url, tmp_path / "hf")
        first = phiedge(["fetch", REPO, "-o", str(out)], env, wait=False)
        assert hub.stalled.wait(120), first.communicate(timeout=30)
        partial = out / ".cache" / "huggingface" / "download"
        for _ in range(600):
            kept = [p.stat().st_size for p in partial.rglob("*.incomplete")] if partial.exists() else []
            if kept and kept[0] >= 10 * 2**20:
                break
            time.sleep(0.1)
        first.kill()
        first.communicate(timeout=30)
        assert kept and kept[0] == 10 * 2**20 and not (out / "model.safetensors").exists()
        second = phiedge(["fetch", REPO, "-o", str(out)], env)
    assert second.returncode == 0, second.stderr
    assert (out / "model.safetensors").read_bytes() == weights
    ranges = [r for method, path, r in hub.log if method == "GET" and path.endswith("/model.safetensors")]
    assert ranges == [None, f"bytes={10 * 2**20}-"]
