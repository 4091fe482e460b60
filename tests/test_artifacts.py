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


# The pipeline's floors, lowest first: a module imports phiedge modules of its own floor or lower ones only.
# Floor 0 is the package's root (errors, schema, catalog, artifacts, ...); the packages show the pipeline.
FLOORS = {
    "phiedge": 0, "phiedge.checkpoints": 1, "phiedge.quantize": 2, "phiedge.bundle": 2, "phiedge.checks": 3,
    "phiedge.build": 4, "phiedge.bench": 5, "phiedge.models": 5, "phiedge.serve": 5, "phiedge.release": 6,
    "phiedge.demo": 6, "phiedge.cli": 7,
}
# What measuring or checking a bundle must not load: the toolchain that made it.
PIPELINE = ("phiedge.checkpoints", "phiedge.quantize", "phiedge.checks", "phiedge.build", "phiedge.release",
            "phiedge.demo", "phiedge.bundle.package")


def floor(module: str) -> int:
    """The floor of a dotted module name: its longest prefix in FLOORS."""
    parts = module.split(".")
    return next(FLOORS[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in FLOORS)


def phiedge_imports() -> dict[str, set[str]]:
    """Module -> the phiedge modules it imports (at the top or in a function), from the source."""
    import ast
    from pathlib import Path

    import phiedge

    src = Path(phiedge.__file__).parent
    graph = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "phiedge":
                assert node.level == 0, f"{name}: relative import"
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "phiedge")
        graph[name] = deps
    # `from phiedge.x import name`: the module phiedge.x.name where it is one, else phiedge.x
    return {name: {d if d in graph else d.rsplit(".", 1)[0] for d in deps} - {name} for name, deps in graph.items()}


def test_bench_and_verify_import_nothing_of_the_build_pipeline(tmp_path):
    """Measuring or checking a bundle on a device loads what that needs, not the toolchain that made it; the
    command line, which imports every command, loads no heavy library for them."""
    code = f"""
import sys
import phiedge.bench.measure, phiedge.bench.report, phiedge.bundle.verify
modules = sorted(m for m in sys.modules if m.startswith("phiedge."))
from phiedge.cli import cli
for args in (["verify", "--no-load", {str(tmp_path / 'none')!r}], ["bench", {str(tmp_path / 'none')!r}]):
    try:
        cli(args, standalone_mode=False)
    except Exception:
        pass
heavy = [m for m in ("torch", "transformers", "olive", "onnx") if m in sys.modules]
print(json.dumps([modules, heavy]))
"""
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    loaded, heavy = json.loads(out.stdout.splitlines()[-1])
    assert {"phiedge.bundle.verify", "phiedge.bench.measure", "phiedge.artifacts"} <= set(loaded)
    assert [m for m in loaded if m.startswith(PIPELINE)] == []
    assert heavy == []


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(m, d) for m, deps in graph.items() for d in deps if floor(d) > floor(m)]


def test_imports_go_down_the_floors_and_are_at_the_top():
    """No import circle, no import from a lower floor to a higher one, no phiedge import inside a function."""
    import ast
    from pathlib import Path

    import phiedge

    graph = phiedge_imports()
    assert upward(graph) == []
    lazy = []
    for path in Path(phiedge.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{path.name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)
                         and (n.level or (n.module or "").split(".")[0] == "phiedge")]
    assert lazy == []

    def reach(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []


def test_the_floor_rule_catches_an_upward_import():
    """The rule above is not vacuous: the quantizer importing the build stages, or the artifacts the command
    line, is caught."""
    graph = phiedge_imports()
    assert "phiedge.quantize.quantizer" in graph and "phiedge.artifacts" in graph
    graph["phiedge.quantize.quantizer"].add("phiedge.build.stages")
    graph["phiedge.artifacts"].add("phiedge.cli")
    assert sorted(upward(graph)) == [("phiedge.artifacts", "phiedge.cli"),
                                     ("phiedge.quantize.quantizer", "phiedge.build.stages")]


def test_every_exception_class_lives_in_errors():
    """One home for what can go wrong: a class deriving from an exception anywhere else is a defect."""
    import ast
    import builtins
    from pathlib import Path

    import phiedge
    from phiedge import errors

    exceptions = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                  and issubclass(getattr(builtins, n), BaseException)} | set(vars(errors))
    elsewhere = [f"{path.name}:{node.name}" for path in Path(phiedge.__file__).parent.rglob("*.py")
                 if path.name != "errors.py" for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", None)) in exceptions
                                                           for b in node.bases)]
    assert elsewhere == []
