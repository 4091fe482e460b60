"""`phiedge build`: a target's Olive recipe on a checkpoint, checked by phiedge, written atomically."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import (__version__, budget, calibrate, catalog, checks, genai_config, graph_check, graph_fixes,
               olive_config, olive_runner, prequant, telemetry)
from .artifacts import RECORD, REPORT, ModelFolder
from .checkpoint import parameter_shapes
from .corpus import write_calibration
from .errors import BuildError
from .exports import Exports
from .plan import BuildOptions, Plan, plan
from .progress import Progress
from .validate import raise_on_failure, validate
from .workspace import check_output, staged_dir

__all__ = ["RECORD", "BuildOptions", "Exports", "Plan", "build", "plan"]  # where callers found them before plan.py

# What a model folder needs at run time; Olive's footprints and run history stay behind.
ARTIFACT_SUFFIXES = (".onnx", ".onnx.data", ".json", ".jinja", ".txt", ".model")
OLIVE_ONLY = {"footprint.json", "output_footprint.json", "model_config.json", "run_history.txt"}
# How a write that failed for want of space shows in the Olive child's output (a Python OSError, or C++).
DISK_FULL = ("[Errno 28]", "No space left on device")
STACK = ("olive-ai", "onnx", "onnxruntime", "onnxruntime-genai", "transformers", "torch")


def stack_versions() -> dict[str, str]:
    found = {"phiedge": __version__}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


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
    cmd = [sys.executable, "-m", "phiedge.olive_runner", str(config_path)]
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


def calibration(p: Plan, calibration_text: str | None, out: Path, progress: Progress) -> dict | None:
    """With int4 calibrate: each matrix's input importance from the checkpoint, also written into the output
    folder (for validation to re-create the same weights; the record describes it)."""
    if not (p.streamed and p.int4.calibrate):
        return None
    progress.step(f"calibrating: input mean squares of every matrix over {calibrate.TOKENS} tokens of "
                  f"{calibration_text or 'the stdlib training split'}, one decoder layer at a time")
    importance, run = calibrate.collect(p.checkpoint.path, calibration_text, progress=progress)
    calibrate.save(out / calibrate.IMPORTANCE, importance, run)
    progress.step(f"calibration: {run['tokens']} tokens in {run['seconds']} s")
    prequant.release_memory()
    return importance


def stream_quantize(p: Plan, dest: Path, progress: Progress, importance: dict | None = None) -> None:
    """Method stream: quantize the checkpoint matrix by matrix into the folder the builder reads."""
    matrices = prequant.count_matrices(p.checkpoint.path, p.int4.embeddings)
    how = {"rtn": "ONNX Runtime's round-to-nearest kernel",
           "mse": "least-squared-error block scales" + (", weighted by the calibration" if importance else "")}
    progress.step(f"quantizing {matrices} matrices one at a time ({how[p.int4.quantizer]}, block "
                  f"{p.int4.block_size}, LM head at {p.int4.lm_head_bits} bits"
                  f"{', shared with the embedding' if p.int4.embeddings == prequant.SHARED else ''})")
    with progress.bar(matrices, "quantize") as bar:
        prequant.write(p.checkpoint.path, dest, p.int4.block_size, p.int4.symmetric, p.int4.lm_head_bits,
                       p.int4.embeddings, on_matrix=lambda _: bar.update(1), quantizer=p.int4.quantizer,
                       eight_bit=p.int4.eight_bit, importance=importance)
    prequant.release_memory()


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


# Where and how long: true of one run, not of the model. Left out of the files in the output folder, so the
# same inputs give byte-identical folders (and bundles) wherever and whenever they are built.
VOLATILE = {"build_seconds", "built", "reference"}


def reproducible(data: dict) -> dict:
    out = {k: v for k, v in data.items() if k not in VOLATILE}
    if isinstance(out.get("source"), dict):
        out["source"] = {k: v for k, v in out["source"].items() if k != "path"}
    return out


def build(model_dir: str | Path, target_name: str, out: str | Path, options: BuildOptions = BuildOptions(),
          force: bool = False, progress: Progress | None = None, exports: Exports | None = None) -> dict:
    """Build, fix up, check and write the model folder; return the build record (also saved in it)."""
    progress = progress or Progress(quiet=True)
    p = plan(model_dir, target_name, options)
    out = Path(out)
    check_output(out, force)
    started = time.perf_counter()
    with staged_dir(out, force=force, progress=progress) as tmp:
        work = tmp / ".work"
        work.mkdir()
        progress.step(f"building {p.checkpoint.variant or p.checkpoint.architecture} for {p.target.name} "
                      f"({p.precision}) with Olive")
        config = p.olive_config(work)
        if any((d.get("load_dataset_config") or {}).get("data_files") == str(olive_config.calibration_file(work))
               for d in config.get("data_configs") or []):
            n = write_calibration(olive_config.calibration_file(work), options.calibration)
            progress.step(f"calibration: {n} samples from {options.calibration or 'the stdlib training split'}")
        for note in p.notes:
            progress.warn(note)
        key = Exports.key(p, options.calibration)
        shared = exports.get(key, tmp) if exports is not None else None
        if shared is not None:
            files, passes, shared_with = shared
            progress.step(f"reusing the export made for target {shared_with} (same recipe and settings)")
        else:
            importance = calibration(p, options.calibration, tmp, progress)
            if p.streamed:
                stream_quantize(p, p.builder_input(work), progress, importance)
            del importance
            olive_output, passes = run_olive(config, work, p.checkpoint.config["num_hidden_layers"], progress)
            files = collect(olive_output, tmp)
            if p.streamed:  # the quantized checkpoint is as big as the model: free the disk before validating
                shutil.rmtree(p.builder_input(work))
            if p.streamed and p.int4.embeddings == prequant.SHARED:  # before the export is kept for reuse
                saved = graph_fixes.share_tied_table(tmp / genai_config.read(tmp)["model"]["decoder"]["filename"])
                progress.step(f"one table for the embedding and the LM head: {saved / 1e6:.1f} MB less on disk")
            if exports is not None:
                exports.put(key, tmp, passes, p.target.name)
        folder = ModelFolder(tmp)  # what the checks below read, read once
        model_file = folder.decoder_name
        fixed = graph_fixes.layernorm_epsilon(folder.decoder_file, p.checkpoint.config)
        runtime = genai_config.apply_runtime(tmp, p.context_cap, p.threads)
        folder.reload()
        progress.step("checking the output")
        found = checks.check_model_dir(tmp)
        model_graph = folder.graph  # read once for the graph, budget and size checks
        target_checks = p.target.checks
        graph = None
        if target_checks is not None:
            graph = graph_check.check_graph(tmp, p.target.execution_provider, target_checks, model_graph)
        runs_here = p.target.runs_here
        if runs_here:
            checks.smoke_generate(tmp)
        memory, warning = budget.check(budget.estimate(tmp, model_graph), p.target.device, p.target.name)
        if warning:
            progress.warn(warning)
        shutil.rmtree(work)
        report = None
        if options.validate and runs_here:
            progress.step(f"validating against {p.checkpoint.path} in transformers")
            report = validate(folder, p.checkpoint.path, p.precision, p.validation, target=p.target.name,
                              int4=p.int4 if p.precision == "int4" else None)
            report["built"] = str(out.resolve())
            (tmp / REPORT).write_text(json.dumps(reproducible(report), indent=2) + "\n")
            raise_on_failure(report)
        record = {
            "phiedge_version": __version__,
            "target": p.target.name,
            "recipe": p.recipe_name,
            "olive_passes": passes,
            "execution_provider": p.target.execution_provider,
            "bundle": p.target.bundle.model_dump(),
            "precision": p.precision,
            "int4": p.int4.model_dump() if p.precision == "int4" else None,
            "calibration": calibrate.describe(tmp / calibrate.IMPORTANCE),
            "runtime": runtime,
            "source": {"path": str(p.checkpoint.path), "name": Path(p.checkpoint.path).name,
                       "architecture": p.checkpoint.architecture,
                       "params": sum(math.prod(s) for s in parameter_shapes(p.checkpoint.config).values()),
                       "variant": p.checkpoint.variant, "shrunk": p.checkpoint.shrunk,
                       "notes": list(p.checkpoint.notes)},
            "fixes": {"layernorm_epsilon_nodes": fixed},
            "notes": list(p.notes),
            "checks": {"graph": graph, "loaded_here": runs_here, "numeric_validation": report is not None,
                       "not_run_here": None if runs_here else
                       f"{p.target.execution_provider} is not available on this machine: the graph was checked "
                       "against the provider's operator list and genai_config.json, not run",
                       "memory": memory},
            "validation": None if report is None else {
                "passed": report["passed"], "enforced": report["enforced"], "failures": report["failures"],
                **{k: v for k, v in report["metrics"].items() if k != "prompts"},
                "dequantized": report["dequantized"]},
            "files": sorted(found["files"] + [RECORD] + ([REPORT] if report else [])),
            "size_bytes": sum((tmp / f).stat().st_size for f in files),
            "weights": budget.weight_accounting(tmp / model_file, model_graph),
            "build_seconds": round(time.perf_counter() - started, 1),
            "versions": stack_versions(),
        }
        (tmp / RECORD).write_text(json.dumps(reproducible(record), indent=2) + "\n")
    progress.step(f"wrote {out}")
    return record
