"""Run an Olive workflow in a child process and watch it: progress from its log, a full disk, passes it skipped."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from phiedge import telemetry
from phiedge.build import olive_runner
from phiedge.errors import BuildError
from phiedge.progress import Progress

# What a model folder needs at run time; Olive's footprints and run history stay behind.
ARTIFACT_SUFFIXES = (".onnx", ".onnx.data", ".json", ".jinja", ".txt", ".model")
OLIVE_ONLY = {"footprint.json", "output_footprint.json", "model_config.json", "run_history.txt"}
# How a write that failed for want of space shows in the Olive child's output (a Python OSError, or C++).
DISK_FULL = ("[Errno 28]", "No space left on device")


def olive_env(workdir: Path) -> dict[str, str]:
    """Offline, no telemetry, and a Hugging Face cache of the build's own (the builder writes there)."""
    env = telemetry.opt_out(dict(os.environ))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(workdir / "hf-home"), PYTHONUNBUFFERED="1")
    env[olive_runner.PARENT] = str(os.getpid())
    return env


def run_olive(config: dict, workdir: Path, n_layers: int, progress: Progress) -> tuple[Path, list[str]]:
    """Run the workflow in a child process; return Olive's output folder and the passes that ran.

    A full disk in the child is raised as the OSError it was, for the staged output to report in one line."""
    config_path = workdir / "olive_config.json"
    log_path = workdir / "olive.log"
    config_path.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "phiedge.build.olive_runner", str(config_path)]
    passes = []
    disk_full = False
    with open(log_path, "w") as log, progress.bar(n_layers, "export layers") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=olive_env(workdir), bufsize=1)
        try:  # whatever stops phiedge here (Ctrl-C, SIGTERM, a full disk for the log) stops Olive too
            for line in proc.stdout:
                log.write(line)
                disk_full = disk_full or any(s in line for s in DISK_FULL)
                if line.startswith("Reading layer"):
                    bar.update(1)
                elif "Running pass" in line or line.startswith("Saving ONNX model"):
                    progress.step("olive: " + line.split("] ")[-1].strip())
                    if "Running pass" in line:
                        passes.append(line.rsplit("Running pass", 1)[1].strip().split(":")[0])
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    output = Path(config["output_dir"])
    if proc.returncode != 0 or not (output / "genai_config.json").is_file():
        if disk_full:  # Olive's own write failed: the caller's one line for a full disk, not "no model"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise BuildError(f"Olive produced no model (exit {proc.returncode}): {last_error(log_path)}")
    missing = [name for name in config["passes"] if name not in passes]
    if missing:  # Olive skips a pass whose config it rejects for this accelerator, and says so only in its log
        raise BuildError(f"Olive did not run pass(es) {', '.join(missing)} of the recipe: {last_error(log_path)}")
    return output, passes


def last_error(log_path: Path) -> str:
    """The most telling line of an Olive log: the last exception or error line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "error:" in line:
            return line[-400:]
    return lines[-1][-400:] if lines else "no output (see the log)"


def collect(olive_output: Path, dest: Path) -> list[str]:
    moved = []
    for path in sorted(olive_output.iterdir()):
        if path.is_file() and path.name not in OLIVE_ONLY and path.name.endswith(ARTIFACT_SUFFIXES):
            os.replace(path, dest / path.name)
            moved.append(path.name)
    return moved
