import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phiedge.build import olive
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.bundle.generate import generate, load
from phiedge.checks.greedy import greedy_parity
from phiedge.errors import BuildError, ConfigError, ModelError

VARIANTS = ["phi-4-mini", "phi-3-mini-4k", "phi-2"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_build_matches_transformers_greedy(builds, checkpoints, variant):
    results = greedy_parity(builds(variant, "fp32"), checkpoints[variant], max_new_tokens=32)
    assert len(results) == 3
    for r in results:
        assert len(r["reference"]) == 32  # random models rarely emit an end token; all 32 are compared
        assert r["built"] == r["reference"], f"{variant}: diverged after {r['agree']} tokens on {r['prompt']!r}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_int4_build_loads_and_generates(builds, variant):
    out = builds(variant, "int4")
    model, tokenizer = load(str(out))
    tokens = list(generate(model, list(tokenizer.encode("def main():")), max_new_tokens=16))
    assert len(tokens) == 16
    record = json.loads((out / "phiedge_build.json").read_text())
    # the target's block 256 does not divide the tests' widths (384 and 512; phi-2's 320 and 640): the plan's fallback
    assert record["precision"] == "int4" and record["int4"]["block_size"] == (64 if variant == "phi-2" else 128)
    assert record["source"]["variant"] == variant and record["source"]["shrunk"]


def test_int4_is_quantized_and_smaller_than_fp32(builds):
    import onnx

    def ops(folder):
        return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}

    int4, fp32 = builds("phi-4-mini", "int4"), builds("phi-4-mini", "fp32")
    assert "MatMulNBits" in ops(int4) and "MatMulNBits" not in ops(fp32)
    assert (int4 / "model.onnx.data").stat().st_size < 0.6 * (fp32 / "model.onnx.data").stat().st_size


def test_genai_config_is_capped_and_threaded(builds, checkpoints):
    out = builds("phi-4-mini", "int4")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["context_length"] == 131072  # the model's own, kept
    assert cfg["search"]["max_length"] == 4096  # the cpu target's cap, not 131072
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] >= 1


def test_output_holds_model_files_only(builds):
    names = {p.name for p in builds("phi-4-mini", "int4").iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "phiedge_build.json"} <= names
    assert not names & {"footprint.json", "run_history.txt", ".work"}
    assert not any(n.startswith(".") for n in names)


def test_tokenizers_agree(builds, checkpoints):
    """onnxruntime-genai reads the synth tokenizer exactly as transformers does."""
    from transformers import AutoTokenizer

    _, og_tok = load(str(builds("phi-4-mini", "int4")))
    hf_tok = AutoTokenizer.from_pretrained(checkpoints["phi-4-mini"])
    for text in ["def f(x):\n    return x  # ünïcødé ✓", "<|user|>hi<|end|><|assistant|>", "  spaces\t\ttabs\n\n"]:
        assert list(og_tok.encode(text)) == hf_tok(text, add_special_tokens=False)["input_ids"], text


def test_context_cap_and_threads_options(checkpoints, tmp_path):
    p = plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(context_cap=1024, threads=3))
    assert (p.context_cap, p.threads) == (1024, 3)


@pytest.mark.parametrize("options, words", [
    (BuildOptions(int4={"block_size": 7}), "block_size"),
    (BuildOptions(context_cap=0), "context cap"),
    (BuildOptions(precision="fp16"), "precision fp16"),
    (BuildOptions(threads=0), "threads"),
    (BuildOptions(calibration="/nonexistent/calib.txt"), "calibration file"),
    (BuildOptions(thresholds={"top1": 2.0}), "threshold"),
])
def test_bad_options_are_config_errors(checkpoints, options, words):
    with pytest.raises(ConfigError, match=words):
        plan(checkpoints["phi-4-mini"], "cpu", options)


def test_a_block_that_does_not_divide_the_widths_falls_back_unless_asked_for(checkpoints):
    """The target's block 256 divides every published Phi's widths, not the tests' 384: the plan takes the largest
    block that does and says so; a block the user asked for is refused instead of quietly changed."""
    p = plan(checkpoints["phi-4-mini"], "cpu")
    assert p.int4.block_size == 128 and any("256 does not divide" in n and "block 128 instead" in n for n in p.notes)
    # every int4 method needs it: Olive's rtn and gptq refuse "in_features 384 must be divisible by group_size 256"
    assert plan(checkpoints["phi-2"], "cpu").int4.block_size == 64  # widths 320 and 640
    uneven = r"block_size 256 does not divide the checkpoint's matrix widths \(384, 512\)"
    with pytest.raises(ConfigError, match=uneven):
        plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"block_size": 256}))


def test_all_option_problems_reported_together(checkpoints):
    with pytest.raises(ConfigError) as exc:
        plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"block_size": 7}, context_cap=0))
    assert len(exc.value.problems) == 2


def test_olive_failure_is_detected_and_nothing_is_left(checkpoints, tmp_path):
    """Olive exits 0 on a failed workflow; phiedge must notice and leave no output."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["phi-4-mini"], broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()  # swap a matrix's dimensions in the header: same bytes, loading fails
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2
                and v["shape"][0] != v["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="Olive produced no model"):
        build(broken, "cpu", out, BuildOptions(int4={"method": "builder"}))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(ModelError, match=re.escape(f"{name} is {header[name]['shape']} in the checkpoint, but the "
                                                   f"config makes it {header[name]['shape'][::-1]}")):
        build(broken, "cpu", out)  # method stream reads the weights itself, and checks them first
    assert not out.exists()


def test_failed_rebuild_keeps_earlier_output(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("earlier good output")

    def fail(*args, **kwargs):
        raise BuildError("simulated failure")

    monkeypatch.setattr(olive, "run_olive", fail)
    with pytest.raises(BuildError):
        build(checkpoints["phi-4-mini"], "cpu", out, force=True)
    assert (out / "model.onnx").read_text() == "earlier good output"


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception, match="already exists"):
        build(checkpoints["phi-4-mini"], "cpu", out)


def test_interrupt_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(olive, "run_olive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(checkpoints["phi-4-mini"], "cpu", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_olive_runs_offline_without_telemetry(tmp_path, monkeypatch):
    monkeypatch.delenv("OLIVE_DISABLE_TELEMETRY", raising=False)
    env = olive.olive_env(tmp_path)
    for key in ("OLIVE_DISABLE_TELEMETRY", "ORT_DISABLE_TELEMETRY", "ORTGENAI_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        assert env[key] == "1", key
    assert env["HF_HOME"].startswith(str(tmp_path))  # the builder's cache stays inside the build


def test_over_budget_build_warns_with_numbers(checkpoints, tmp_path, monkeypatch, capsys):
    from phiedge import catalog
    from phiedge.progress import Progress
    from phiedge.schema import Device

    phone = catalog.find_target("android").model_copy(update={"device": Device(ram_gb=0.01, budget=0.5)})
    monkeypatch.setattr(catalog, "find_target", lambda name: phone)
    record = build(checkpoints["phi-4-mini"], "android", tmp_path / "out", BuildOptions(validate=False),
                   progress=Progress(quiet=True))
    memory = record["checks"]["memory"]
    assert memory["fits"] is False and memory["budget_bytes"] == 5_000_000
    assert memory["kv_cache_bytes"] == 2 * 2 * 1 * 128 * 2048 * 4  # 2 layers, 1 KV head of 128, cap 2048, fp32
    err = capsys.readouterr().err
    assert "warning: does not fit the android memory budget" in err and "at 2048 tokens" in err


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_custom_code_in_a_checkpoint_is_never_run(checkpoints, tmp_path, monkeypatch, precision):
    """Published Phi-3 folders name modeling code (auto_map): phiedge builds with transformers' own classes.
    int4 is the default target's path (method stream): the folder Olive reads has neither the code nor auto_map."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["phi-4-mini"], folder)
    marker = tmp_path / "code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import Phi3Config, Phi3ForCausalLM\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.Phi3Config", "AutoModelForCausalLM": "modeling_evil.Phi3ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Tok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    olive_reads = {}
    run_olive = olive.run_olive

    def spy(config, *args):
        read = Path(config["input_model"]["model_path"])
        olive_reads.update(folder=read, code=sorted(p.name for p in read.glob("*.py")),
                           auto_map=[f for f in ("config.json", "tokenizer_config.json")
                                     if "auto_map" in json.loads((read / f).read_text())])
        return run_olive(config, *args)

    monkeypatch.setattr(olive, "run_olive", spy)
    record = build(folder, "cpu", tmp_path / "out", BuildOptions(precision=None if precision == "int4" else precision))
    assert record["precision"] == precision and not marker.exists()
    assert record["validation"]["positions"] > 0  # the reference was loaded and run too
    assert "never runs remote code" in record["source"]["notes"][0]
    if precision == "int4":
        assert record["int4"]["method"] == "stream" and olive_reads["folder"] != folder.resolve()
        assert olive_reads["code"] == [] and olive_reads["auto_map"] == []
    else:
        assert record["validation"]["passed"] is True and olive_reads["folder"] == folder.resolve()


def test_rtn_recipe_hands_the_builder_a_quantized_checkpoint(checkpoints, tmp_path):
    """recipes/cpu-rtn.yaml: Olive's Rtn pass, then the builder reads the int4 weights (less memory)."""
    record = build(checkpoints["phi-4-mini"], "cpu", tmp_path / "out", BuildOptions(recipe="cpu-rtn", int4={"method": "builder"}))
    assert record["olive_passes"] == ["rtn", "builder"] and record["recipe"] == "cpu-rtn"
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    assert heads and dict((a.name, a.i) for a in heads[0].attribute)["block_size"] == 128
    assert record["validation"]["positions"] > 0  # validated like any build (fed token by token: pruned head)


def test_full_disk_in_the_olive_child_is_one_line_and_leaves_nothing(runner, checkpoints, full_disk):
    """fp32 without validation: the first large write is the Olive child's model (tens of MB on 1 MiB)."""
    from phiedge.cli import cli

    out = full_disk / "out"
    result = runner.invoke(cli, ["build", "--model", checkpoints["phi-4-mini"], "--target", "cpu", "--precision",
                                 "fp32", "--no-validate", "-q", "-o", str(out)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"Error: writing {out} failed: the disk is full"], result.output
    assert list(full_disk.iterdir()) == []


def olive_child(pid: int) -> int | None:
    """The Olive child process of `pid`, once it runs phiedge.olive_runner."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"phiedge.build.olive_runner" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # or a zombie
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the Olive child through /proc")
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sigkill"])
def test_a_stopped_build_stops_olive_and_leaves_nothing(checkpoints, tmp_path, capsys, stop):
    """A real `phiedge build`: Ctrl-C (SIGINT to its process group, as a terminal sends it) exits 130, SIGTERM
    143, both after removing the partial output; SIGKILL (the out-of-memory killer) cannot clean up, but
    Olive dies with phiedge and the next writer removes the partial."""
    from phiedge.workspace import staged_dir

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(olive.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", "from phiedge.cli import cli; cli()", "build", "--model",
                             checkpoints["phi-4-mini"], "--target", "cpu", "--precision", "fp32", "--no-validate",
                             "-q", "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            # as from a terminal: a shell script's background job (`pytest &`) starts with SIGINT
                            # ignored, and a child inherits that, so Ctrl-C would never reach phiedge
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while (child := olive_child(proc.pid)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no Olive child appeared"
            time.sleep(0.05)
        time.sleep(1)  # past Popen's return in phiedge, which stops the child from then on
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while not gone(child):
            assert time.monotonic() < deadline, "the Olive child outlived phiedge"
            time.sleep(0.05)
    finally:  # whatever failed, nothing of this build (phiedge or an orphaned Olive) outlives the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert "Traceback" not in err
    if stop == "sigkill":
        assert proc.returncode == -signal.SIGKILL
        left = tmp_path / f".out.partial-{proc.pid}"
        assert left.is_dir()
        with staged_dir(out):
            pass
        assert f"removed {left}" in capsys.readouterr().err
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
    else:
        assert proc.returncode == {"ctrl-c": 130, "sigterm": 128 + signal.SIGTERM}[stop], err
        assert err.strip() == f"phiedge: {'interrupted' if stop == 'ctrl-c' else 'terminated'}; nothing was written"
        assert list(tmp_path.iterdir()) == []
