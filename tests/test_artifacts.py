"""The files phiedge writes, read back: whatever an edited, truncated or foreign file holds, one line."""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from phiedge.artifacts import FORMAT, MANIFEST, RECORD, REPORT
from phiedge.cli import cli

BROKEN = {  # how a file can be wrong: not JSON, a key missing, a key of the wrong type
    "not JSON": lambda data, key, wrong: "{",
    "missing key": lambda data, key, wrong: json.dumps({k: v for k, v in data.items() if k != key}),
    "wrong type": lambda data, key, wrong: json.dumps({**data, key: wrong}),
}


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a click error, not an escaped exception
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture
def folder(builds, tmp_path):
    """A built model folder's small files (the checks reach the record before any weight)."""
    built, out = builds("phi-4-mini", "int4"), tmp_path / "m"
    out.mkdir()
    for name in ("genai_config.json", RECORD, REPORT):
        shutil.copy(built / name, out / name)
    return out


@pytest.mark.parametrize("how", BROKEN)
@pytest.mark.parametrize("command", ["package", "bench", "run", "validate"])
def test_a_malformed_build_record_is_one_line(folder, checkpoints, runner, tmp_path, how, command):
    path = folder / RECORD
    path.write_text(BROKEN[how](json.loads(path.read_text()), "precision", {"int4": True}))
    args = {"package": ["package", str(folder), "-o", str(tmp_path / "b.zip")],
            "bench": ["bench", str(folder), "-p", "4", "-n", "2", "-r", "1"],
            "run": ["run", str(folder), "--prompt", "hi"],
            "validate": ["validate", str(folder), "--reference", str(checkpoints["phi-4-mini"])]}[command]
    one_line_error(runner.invoke(cli, args), RECORD)
    assert not (tmp_path / "b.zip").exists()


@pytest.mark.parametrize("how", BROKEN)
def test_a_malformed_validation_report_is_one_line(folder, runner, tmp_path, how):
    path = folder / REPORT
    path.write_text(BROKEN[how](json.loads(path.read_text()), "metrics", [0.1]))
    one_line_error(runner.invoke(cli, ["package", str(folder), "-o", str(tmp_path / "b.zip")]), REPORT)
    assert not (tmp_path / "b.zip").exists()


MANIFEST_DATA = {"format": FORMAT, "name": "b", "min_runtime": {"onnxruntime-genai": "0.1"}, "files": {}}


@pytest.mark.parametrize("how", BROKEN)
@pytest.mark.parametrize("key, wrong", [("files", {"model/x": {"size": "1", "sha256": "0"}}), ("name", 3),
                                        ("min_runtime", {"onnxruntime-genai": 14})])
def test_a_malformed_manifest_is_one_line(runner, tmp_path, how, key, wrong):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / MANIFEST).write_text(BROKEN[how](MANIFEST_DATA, key, wrong))
    one_line_error(runner.invoke(cli, ["verify", "--no-load", str(bundle)]), MANIFEST)
    one_line_error(runner.invoke(cli, ["bench", str(bundle), "-p", "4", "-n", "2", "-r", "1"]), MANIFEST)
    (tmp_path / "dist").mkdir()
    with zipfile.ZipFile(tmp_path / "dist" / "b.zip", "w") as zf:
        zf.writestr(f"b/{MANIFEST}", (bundle / MANIFEST).read_text())
    one_line_error(runner.invoke(cli, ["index", str(tmp_path / "dist")]), MANIFEST)


def test_the_well_formed_manifest_gets_past_the_manifest(runner, tmp_path):
    """The control for the test above: its manifest, unbroken, is believed, and verify goes on to the files."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / MANIFEST).write_text(json.dumps(MANIFEST_DATA))
    one_line_error(runner.invoke(cli, ["verify", "--no-load", str(bundle)]), "model has no genai_config.json")


PIPELINE = ["build", "validate", "olive_config", "olive_runner", "prequant", "quantizer", "package", "release",
            "dequant_reference", "reference", "graph_fixes", "checkpoint", "synth", "train", "corpus", "tokenizer",
            "calibrate", "demo"]


def test_bench_and_verify_import_nothing_of_the_build_pipeline(tmp_path):
    """Measuring or checking a bundle on a device loads what that needs, not the toolchain that made it."""
    code = f"""
import sys
import phiedge.bench, phiedge.verify, phiedge.report
from phiedge.cli import cli
for args in (["verify", "--no-load", {str(tmp_path / 'none')!r}], ["bench", {str(tmp_path / 'none')!r}]):
    try:
        cli(args, standalone_mode=False)
    except Exception:
        pass
heavy = [m for m in ("torch", "transformers", "olive") if m in sys.modules]
print(json.dumps([sorted(m.split(".")[-1] for m in sys.modules if m.startswith("phiedge.")), heavy]))
"""
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    loaded, heavy = json.loads(out.stdout.splitlines()[-1])
    assert {"verify", "bench", "artifacts", "report"} <= set(loaded)
    assert set(loaded).isdisjoint(PIPELINE), sorted(set(loaded) & set(PIPELINE))
    assert heavy == []


def test_no_import_circle():
    """Every import between phiedge's modules, lazy ones too, goes one way."""
    import ast
    from pathlib import Path

    import phiedge

    src = Path(phiedge.__file__).parent
    graph = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        package = parts[:-1]
        parts = package if parts[-1] == "__init__" else parts
        graph[".".join(parts)] = [(package, node) for node in ast.walk(ast.parse(path.read_text()))
                                  if isinstance(node, ast.ImportFrom) and node.level]
    for name, imports in graph.items():
        deps = set()
        for package, node in imports:
            stem = list(package[:len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            for alias in node.names:
                full = ".".join([*stem, alias.name])
                deps.add(full if full in graph else ".".join(stem))
        graph[name] = {d for d in deps if d and d in graph and d != name}

    def reach(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []
