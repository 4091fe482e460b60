"""The GitHub Actions workflows cannot run here: check they are well formed and run phiedge as the tests do."""

import re
import shlex
from pathlib import Path

import yaml

from phiedge.cli import cli

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def phiedge_commands(workflow: dict) -> list[list[str]]:
    lines = [line for job in workflow["jobs"].values() for step in job["steps"] for line in
             step.get("run", "").splitlines()]
    commands = []
    for line in lines:
        for part in re.split(r"&&|;", re.sub(r"\$\{\{[^}]*\}\}", "cpu", line)):
            words = shlex.split(part)
            if words and words[0] == "phiedge":
                commands.append(words[1:])
    return commands


def test_ci_runs_the_test_command_on_every_push():
    ci = load("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    steps = ci["jobs"]["tests"]["steps"]
    assert [s["name"] for s in steps] == ["checkout", "python", "tests"]
    assert steps[-1]["run"] == ".ci/run" and (ROOT / ".ci" / "run").is_file()
    assert steps[1]["with"]["cache"] == "pip"


def test_release_builds_a_matrix_of_targets_verifies_and_uploads():
    release = load("release.yml")
    assert release["on"]["push"]["tags"] == ["v*"] and "model" in release["on"]["workflow_dispatch"]["inputs"]
    assert set(release["jobs"]) == {"targets", "bundle", "publish"}
    bundle = release["jobs"]["bundle"]
    assert bundle["strategy"]["matrix"]["target"] == "${{ fromJSON(needs.targets.outputs.targets) }}"
    assert [s["name"] for s in bundle["steps"]] == ["checkout", "python", "install", "model", "build", "package",
                                                     "verify", "upload"]
    assert bundle["steps"][1]["with"]["cache"] == "pip"
    assert "torch==2.13.0" in bundle["steps"][2]["run"]  # the CPU wheel, as the README installs it
    publish = [s.get("run", "") for s in release["jobs"]["publish"]["steps"]]
    assert "phiedge index dist" in publish


def test_release_signs_with_a_key_from_its_secrets_and_publishes_the_public_key():
    release = load("release.yml")
    steps = {s["name"]: s for s in release["jobs"]["bundle"]["steps"]}
    package, verify = steps["package"], steps["verify"]
    assert package["env"] == {"PHIEDGE_SIGNING_KEY": "${{ secrets.PHIEDGE_SIGNING_KEY }}"}  # no other step sees it
    assert "umask 077" in package["run"] and 'phiedge package out -o dist --sign "$key"' in package["run"]
    assert 'phiedge verify dist/*.zip --trust "$PHIEDGE_PUBLIC_KEY"' in verify["run"]
    assert release["env"]["PHIEDGE_PUBLIC_KEY"] == "${{ vars.PHIEDGE_PUBLIC_KEY }}"
    publish = release["jobs"]["publish"]["steps"]
    assert any("dist/phiedge.pub" in s.get("run", "") for s in publish)
    assert "dist/phiedge.pub" in publish[-1]["with"]["files"]


def test_workflow_commands_are_real_phiedge_commands_and_options():
    commands = phiedge_commands(load("release.yml"))
    assert [c[0] for c in commands] == ["synth", "build", "package", "package", "verify", "verify", "index"]
    for words in commands:
        command = cli.commands[words[0]]
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        assert [w for w in words[1:] if w.startswith("-") and w not in known] == [], words


def test_every_torch_install_takes_the_cpu_wheel_from_pytorchs_index():
    """On Linux PyPI's torch is the CUDA build (several GB); only PyTorch's CPU index serves the CPU wheel
    everywhere (a machine whose pip finds a local CPU wheel hides this)."""
    files = [ROOT / "README.md", ROOT / ".ci" / "run", ROOT / "pyproject.toml", *sorted(WORKFLOWS.glob("*.yml"))]
    installs = {}
    for path in files:
        for line in path.read_text().splitlines():
            for part in re.split(r"&&|;|`", line):
                if re.search(r"pip install\b.*\btorch\b", part):
                    installs[f"{path.name}: {part.strip()}"] = part
    assert {name.split(":")[0] for name in installs} >= {"README.md", "run", "pyproject.toml", "release.yml"}
    for name, part in installs.items():
        words = shlex.split(part)
        assert "torch==2.13.0" in words, name
        assert "--index-url" in words and words[words.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu", name
