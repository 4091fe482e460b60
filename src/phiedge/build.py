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
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError

from . import (__version__, budget, calibrate, catalog, checks, genai_config, graph_check, graph_fixes,
               olive_config, olive_runner, prequant, telemetry)
from .checkpoint import Checkpoint, inspect, parameter_shapes
from .corpus import write_calibration
from .catalog import pydantic_problems
from .errors import BuildError, ConfigError
from .progress import Progress
from .schema import Int4Settings, Target, ValidationSettings
from .validate import REPORT, raise_on_failure, validate, with_overrides
from .workspace import check_output, staged_dir

RECORD = "phiedge_build.json"
# What a model folder needs at run time; Olive's footprints and run history stay behind.
ARTIFACT_SUFFIXES = (".onnx", ".onnx.data", ".json", ".jinja", ".txt", ".model")
OLIVE_ONLY = {"footprint.json", "output_footprint.json", "model_config.json", "run_history.txt"}
PRECISIONS = {"cpu": ("int4", "fp32"), "cuda": ("int4", "fp16", "fp32"), "dml": ("int4", "fp16"),
              "webgpu": ("int4", "fp16", "fp32")}
# How a write that failed for want of space shows in the Olive child's output (a Python OSError, or C++).
DISK_FULL = ("[Errno 28]", "No space left on device")
STACK = ("olive-ai", "onnx", "onnxruntime", "onnxruntime-genai", "transformers", "torch")


@dataclass(frozen=True)
class BuildOptions:
    """What the user may override on top of the target."""

    precision: str | None = None
    int4: dict = field(default_factory=dict)  # block_size, accuracy_level, symmetric, algorithm
    context_cap: int | None = None
    threads: int | None = None
    recipe: str | None = None  # another workflow under recipes/ (e.g. cpu-gptq) instead of the target's
    calibration: str | None = None  # text file for calibrated recipes (default: stdlib training split)
    validate: bool = True  # compare with the checkpoint in transformers; fail the build on a crossed threshold
    thresholds: dict = field(default_factory=dict)  # overrides of the target's thresholds for this precision


@dataclass(frozen=True)
class Plan:
    target: Target
    checkpoint: Checkpoint
    precision: str
    int4: Int4Settings
    context_cap: int
    threads: int
    recipe_name: str
    recipe: dict
    validation: ValidationSettings
    notes: tuple[str, ...] = ()

    @property
    def streamed(self) -> bool:
        return olive_config.streamed(self.precision, self.int4)

    def builder_input(self, workdir: Path) -> Path:
        """What the builder reads: the checkpoint, or phiedge's quantized copy of it (method stream)."""
        return workdir / "quantized" if self.streamed else self.checkpoint.path

    def olive_config(self, workdir: Path) -> dict:
        return olive_config.fill(self.recipe, self.target, self.builder_input(workdir), workdir, self.precision,
                                 self.int4)


def stack_versions() -> dict[str, str]:
    found = {"phiedge": __version__}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# What method builder means for the stream-only settings: the builder's float table, 4-bit LM head, own rounding.
BUILDER_METHOD = {"method": "builder", "embeddings": "float", "lm_head_bits": 4, "quantizer": "rtn", "eight_bit": [],
                  "calibrate": False}


def merge_int4(target: Int4Settings, overrides: dict, notes: list[str]) -> dict:
    """The target's int4 settings with the user's on top. Options only the builder's quantization has
    (another algorithm, float nodes, a shared table) switch a stream target to method builder, and method
    builder drops the stream-only table and LM head precisions the user did not ask for."""
    merged = {**target.model_dump(), **overrides}
    builder_only = [k for k in ("algorithm", "float_nodes", "shared_embeddings")
                    if k in overrides and overrides[k] not in ("default", [], None, False)]
    if "method" not in overrides and merged["method"] == "stream" and builder_only:
        merged["method"] = "builder"
        notes.append(f"int4 method builder: {', '.join(builder_only)} is the builder's quantization setting")
    if merged["method"] == "builder":
        merged.update({k: v for k, v in BUILDER_METHOD.items() if k not in overrides})
    return merged


def plan(model_dir: str | Path, target_name: str, options: BuildOptions = BuildOptions()) -> Plan:
    """Resolve target, checkpoint and options; every option problem is reported at once."""
    target = catalog.find_target(target_name)
    checkpoint = inspect(model_dir)
    problems = []
    precision = options.precision or target.precision
    if precision not in PRECISIONS[target.execution_provider]:
        problems.append(f"precision {precision} is not available on {target.execution_provider} "
                        f"(choose {', '.join(PRECISIONS[target.execution_provider])})")
    notes = []
    try:
        int4 = Int4Settings(**merge_int4(target.int4, options.int4, notes))
    except ValidationError as exc:
        problems.extend(f"int4 {p}" for p in pydantic_problems(exc))
        int4 = target.int4
    cap = options.context_cap if options.context_cap is not None else target.context_cap
    if cap < 1:
        problems.append(f"context cap must be at least 1, not {cap}")
    threads = options.threads if options.threads is not None else target.threads
    if threads == "auto":
        threads = os.cpu_count() or 1
    if threads < 1:
        problems.append(f"threads must be at least 1, not {threads}")
    try:
        validation = with_overrides(target.validation, precision, options.thresholds)
    except ValidationError as exc:
        problems.extend(f"threshold {p}" for p in pydantic_problems(exc))
    if options.calibration is not None and not Path(options.calibration).is_file():
        problems.append(f"calibration file {options.calibration} does not exist")
    if olive_config.streamed(precision, int4) and int4.embeddings == prequant.SHARED \
            and not checkpoint.config.get("tie_word_embeddings"):
        untied = "the checkpoint's LM head is not its embedding table (tie_word_embeddings is false)"
        if "embeddings" in options.int4:
            problems.append(f"int4 embeddings shared: {untied}; choose int8 or int4")
        else:  # the target's default: a table of its own at the LM head's bits
            int4 = int4.model_copy(update={"embeddings": f"int{int4.lm_head_bits}"})
            notes.append(f"int4 embeddings {int4.embeddings} instead of the target's shared: {untied}")
    why = prequant.unsupported(checkpoint.config, checkpoint.path) if olive_config.streamed(precision, int4) else None
    if why and any(key in options.int4 for key in ("method", "embeddings", "lm_head_bits", "quantizer", "eight_bit",
                                                   "calibrate")):
        problems.append(f"int4 method stream: {why}")
    elif why:  # the target's default: fall back to the builder's own quantization of the fp32 graph
        int4 = int4.model_copy(update=BUILDER_METHOD)
        notes.append(f"int4 method builder instead of the target's stream: {why}")
    if olive_config.streamed(precision, int4) and not why and int4.eight_bit:
        _, unmatched = prequant.eight_bit_matrices(prequant.Weights(checkpoint.path).names(), int4.eight_bit)
        problems.extend(f"int4 eight_bit pattern {p!r} matches no layer matrix of the checkpoint" for p in unmatched)
    recipe_name = options.recipe or target.recipe
    recipe = catalog.load_recipe(recipe_name)
    if olive_config.streamed(precision, int4) and olive_config.requantizing_passes(recipe):
        problems.append(f"recipe {recipe_name} quantizes with {', '.join(olive_config.requantizing_passes(recipe))}, "
                        "which int4 method stream has done already: add --int4-method builder")
    if problems:
        raise ConfigError("build options", problems)
    return Plan(target, checkpoint, precision, int4, cap, threads, recipe_name, recipe, validation, tuple(notes))


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
    result_path = workdir / "olive_result.json"
    log_path = workdir / "olive.log"
    config_path.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "phiedge.olive_runner", str(config_path), str(result_path)]
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


class Exports:
    """Olive outputs kept for reuse within one run: targets whose recipe, precision, int4 settings and
    provider agree (with today's targets: android and ios) share one export. Weight files are hard-linked
    (nothing writes them after the builder); the small files are copied, since phiedge edits them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.done: dict[str, tuple[Path, list[str], str]] = {}

    @staticmethod
    def key(p: Plan, calibration: str | None) -> str:
        return json.dumps([p.recipe_name, p.precision, p.int4.model_dump(), p.target.execution_provider,
                           str(p.checkpoint.path), calibration], sort_keys=True)

    @staticmethod
    def copy(src: Path, dest: Path) -> list[str]:
        names = []
        for path in sorted(p for p in src.iterdir() if p.is_file()):
            if path.name.endswith(".onnx.data"):
                os.link(path, dest / path.name)
            else:
                shutil.copy2(path, dest / path.name)
            names.append(path.name)
        return names

    def get(self, key: str, dest: Path) -> tuple[list[str], list[str], str] | None:
        if key not in self.done:
            return None
        folder, passes, target = self.done[key]
        return self.copy(folder, dest), passes, target

    def put(self, key: str, src: Path, passes: list[str], target: str) -> None:
        folder = self.folder / str(len(self.done))
        folder.mkdir(parents=True)
        self.copy(src, folder)
        self.done[key] = (folder, passes, target)


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
        model_file = genai_config.read(tmp)["model"]["decoder"]["filename"]
        fixed = graph_fixes.layernorm_epsilon(tmp / model_file, p.checkpoint.config)
        runtime = genai_config.apply_runtime(tmp, p.context_cap, p.threads)
        progress.step("checking the output")
        found = checks.check_model_dir(tmp)
        model_graph = budget.load_graph(tmp / model_file)  # read once for the graph, budget and size checks
        target_checks = p.target.checks
        graph = None
        if target_checks is not None:
            graph = graph_check.check_graph(tmp, p.target.execution_provider, target_checks, model_graph)
        runs_here = target_checks is None or target_checks.numeric
        if runs_here:
            checks.smoke_generate(tmp)
        memory, warning = budget.check(budget.estimate(tmp, model_graph), p.target.device, p.target.name)
        if warning:
            progress.warn(warning)
        shutil.rmtree(work)
        report = None
        if options.validate and runs_here:
            progress.step(f"validating against {p.checkpoint.path} in transformers")
            report = validate(tmp, p.checkpoint.path, p.precision, p.validation, target=p.target.name,
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
