"""`phiedge build`: a target's Olive recipe on a checkpoint, checked by phiedge, written atomically.

A build is a list of stages (STAGES), each taking the build's state and adding to it: export (phiedge's
calibration and quantization, then Olive), fix, LoRA adapters, check, validate, record. The state is written to a staged
folder that replaces the output only when every stage has passed."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from phiedge import __version__, genai_config
from phiedge.artifacts import RECORD, REPORT, WEIGHTS, AdapterEntry, ModelFolder, WeightDigests, sha256
from phiedge.build import graph_fixes, lora_graph, npu, olive, olive_config
from phiedge.build.exports import Exports
from phiedge.build.plan import BuildOptions, Plan, plan
from phiedge.build.record import STACK, reproducible, stack_versions
from phiedge.bundle.smoke import smoke_generate
from phiedge.checkpoints import tokenizer_files
from phiedge.checkpoints.checkpoint import parameter_shapes
from phiedge.checkpoints.corpus import write_calibration
from phiedge.checks import budget, files, operators
from phiedge.checks.validate import raise_on_failure, validate
from phiedge.errors import BuildError
from phiedge.progress import Progress
from phiedge.quantize import calibrate, prequant, split_table
from phiedge.workspace import check_output, staged_dir


@dataclass
class Build:
    """What the stages share: the plan, where the folder is staged, and what each stage found."""

    plan: Plan
    options: BuildOptions
    out: Path
    tmp: Path
    progress: Progress
    exports: Exports | None
    started: float = field(default_factory=time.perf_counter)
    passes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    fixed: int = 0
    runtime: dict = field(default_factory=dict)
    found: dict = field(default_factory=dict)
    graph: dict | None = None
    memory: dict = field(default_factory=dict)
    report: dict | None = None
    record: dict = field(default_factory=dict)
    adapters: list[dict] = field(default_factory=list)  # artifacts.AdapterEntry of each LoRA adapter
    work: Path = field(init=False)  # Olive's and the quantizer's scratch, inside the staged folder
    folder: ModelFolder = field(init=False)  # read once by the stages after the export

    def __post_init__(self):
        self.work = self.tmp / ".work"
        self.folder = ModelFolder(self.tmp)


def stream_quantize(p: Plan, dest: Path, out: Path, calibration_text: str | None, progress: Progress,
                    split_file: Path) -> None:
    """Method stream: calibrate if the settings ask, then quantize the checkpoint matrix by matrix into the
    folder the builder reads. The calibration's importance (what it was collected from) and every quantized
    matrix's digest (what the dequantized check holds the graph to) go into the output folder."""
    int4 = p.int4
    matrices = prequant.count_matrices(p.checkpoint.path, int4.embeddings)
    source = calibration_text or "the stdlib training split"
    calibration = importance = moments = None
    if int4.calibrate:
        calibration = calibrate.Calibration(p.checkpoint.path, calibration_text,
                                            progress=None if int4.quantizer == "gptq" else progress,
                                            row_probability=bool(int4.eight_bit_rows))
        importance = calibration.importance  # filled as the calibration runs
        if int4.quantizer == "gptq":  # the layers are quantized as the calibration reaches them
            moments = calibration.layers(full=True)
            progress.step(f"calibrating over {calibrate.TOKENS} tokens of {source}, one decoder layer at a time, "
                          "each layer quantized by GPTQ from its inputs' second moments")
        else:
            progress.step(f"calibrating: input mean squares of every matrix over {calibrate.TOKENS} tokens of "
                          f"{source}, one decoder layer at a time")
            for _ in calibration.layers():
                pass
            progress.step(f"calibration: {calibration.run['tokens']} tokens in {calibration.run['seconds']} s")
            prequant.release_memory()
    how = {"rtn": "ONNX Runtime's round-to-nearest kernel",
           "mse": "least-squared-error block scales" + (", weighted by the calibration" if importance else ""),
           "gptq": "GPTQ for the layers" + (" and the table's 4-bit rows" if int4.eight_bit_rows else
                                            ", least-squared-error block scales for the LM head")}
    progress.step(f"quantizing {matrices} matrices one at a time ({how[int4.quantizer]}, block "
                  f"{int4.block_size}, LM head at {int4.lm_head_bits} bits"
                  f"{', shared with the embedding' if int4.embeddings == prequant.SHARED else ''}"
                  f"{f', its {int4.eight_bit_rows:.0%} most probable rows at 8 bits' if int4.eight_bit_rows else ''})")
    with progress.bar(matrices, "quantize") as bar:
        _, digests = prequant.write(p.checkpoint.path, dest, int4.block_size, int4.symmetric, int4.lm_head_bits,
                                    int4.embeddings, on_matrix=lambda _: bar.update(1), quantizer=int4.quantizer,
                                    eight_bit=int4.eight_bit, importance=importance, second_moments=moments,
                                    eight_bit_rows=int4.eight_bit_rows, split_file=split_file)
    if calibration is not None:
        calibrate.save(out / calibrate.IMPORTANCE, calibration.importance, calibration.run)
    (out / WEIGHTS).write_text(WeightDigests(block_size=int4.block_size, symmetric=int4.symmetric,
                                             matrices=digests).model_dump_json(indent=2) + "\n")
    prequant.release_memory()


def export(b: Build) -> None:
    """The ONNX model folder: reused from a target with the same export, or made (calibrate, quantize, Olive)."""
    p, progress = b.plan, b.progress
    b.work.mkdir()
    progress.step(f"building {p.checkpoint.variant or p.checkpoint.architecture} for {p.target.name} "
                  f"({p.precision}) with Olive")
    config = p.olive_config(b.work)
    if any((d.get("load_dataset_config") or {}).get("data_files") == str(olive_config.calibration_file(b.work))
           for d in config.get("data_configs") or []):
        n = write_calibration(olive_config.calibration_file(b.work), b.options.calibration)
        progress.step(f"calibration: {n} samples from {b.options.calibration or 'the stdlib training split'}")
    for note in p.notes:
        progress.warn(note)
    key = Exports.key(p, b.options.calibration)
    shared = b.exports.get(key, b.tmp) if b.exports is not None else None
    if shared is not None:
        b.files, b.passes, shared_with = shared
        progress.step(f"reusing the export made for target {shared_with} (same recipe and settings)")
        return
    if p.streamed:
        stream_quantize(p, p.builder_input(b.work), b.tmp, b.options.calibration, progress,
                        b.work / split_table.FILE)
    olive_output, b.passes = olive.run_olive(config, b.work, p.checkpoint.config["num_hidden_layers"], progress)
    b.files = olive.collect(olive_output, b.tmp)
    if p.streamed:  # the quantized checkpoint is as big as the model: free the disk before validating
        shutil.rmtree(p.builder_input(b.work))
    if p.streamed and p.int4.embeddings == prequant.SHARED and p.int4.eight_bit_rows:  # before the export is kept
        saved = graph_fixes.split_tied_table(b.folder.decoder_file, b.work / split_table.FILE)
        (b.work / split_table.FILE).unlink()
        b.folder.reload()
        progress.step(f"one table for the embedding and the LM head, its most probable rows at 8 bits: "
                      f"{saved / 1e6:.1f} MB less on disk")
    elif p.streamed and p.int4.embeddings == prequant.SHARED:
        saved = graph_fixes.share_tied_table(b.folder.decoder_file)
        b.folder.reload()
        progress.step(f"one table for the embedding and the LM head: {saved / 1e6:.1f} MB less on disk")
    if b.exports is not None:
        b.exports.put(key, b.tmp, b.passes, p.target.name)


def fix(b: Build) -> None:
    """What the builder gets wrong or leaves out: LayerNorm epsilons, the context cap, the thread count, the
    checkpoint's stop tokens and sampling defaults, and the split pattern of a tokenizer it converted."""
    if not b.folder.stages:  # a pipeline's norms are L2Norms with no epsilon (recipes/qnn.yaml's surgeries)
        b.fixed = graph_fixes.layernorm_epsilon(b.folder.decoder_file, b.plan.checkpoint.config)
    b.runtime = genai_config.apply_runtime(b.tmp, b.plan.context_cap, b.plan.threads)
    b.runtime["generation"] = genai_config.apply_generation(b.tmp, b.plan.checkpoint.path)
    conversion = tokenizer_files.apply(b.tmp, b.plan.checkpoint.path, b.plan.checkpoint.variant)
    if conversion:
        b.runtime["tokenizer"] = conversion.model_dump()
        b.progress.step(f"tokenizer.json converted from vocab.json and merges.txt, split as {conversion.split_from}")
    b.folder.reload()


def compile_for_npu(b: Build) -> None:
    """NPU targets: the static decoder models fixed for the HTP (KV length, full rotary), checked against the
    provider's operator list, compiled to QNN context binaries with CPU fallback off, and named in genai_config.json
    with the provider's options; the KV length is the context cap (build/npu.py)."""
    p, settings = b.plan, b.plan.target.npu
    if settings is None:
        return
    stages = {s["name"]: s for s in b.folder.stages}
    missing = [name for name in npu.DECODER_STAGES if name not in stages]
    if missing:
        raise BuildError(f"Olive's output has no {', '.join(missing)} model: not a static NPU pipeline")
    names = [stages[name]["filename"] for name in npu.DECODER_STAGES]
    rewritten = npu.fix_static(b.tmp, names, p.context_cap)
    b.progress.step(f"NPU: KV cache fixed at {p.context_cap} tokens; {rewritten} attention node(s) given a full-head "
                    "rotary (the same function, which QNN's HTP computes right)")
    config = genai_config.read(b.tmp)
    config["model"]["context_length"] = config["search"]["max_length"] = p.context_cap
    options = npu.provider_options(settings)
    for entry in config["model"]["decoder"]["pipeline"]:
        for name, stage in entry.items():
            if name in npu.DECODER_STAGES:
                stage["session_options"] = {"provider_options": [{p.target.provider.genai: options}]}
    genai_config.write(b.tmp, config)
    b.folder.reload()
    if p.target.checks is not None:
        b.graph = operators.check_graph(b.folder, p.target.execution_provider, p.target.checks, names)
    b.progress.step(f"NPU: compiling {' and '.join(names)} for the QNN HTP (htp_arch {settings.htp_arch}, soc_model "
                    f"{settings.soc_model}) with CPU fallback off")
    compiled = {}
    for name in names:
        written = npu.compile_context_binary(b.tmp, name, settings)
        compiled[name] = next(f for f in written if f.endswith(npu.CONTEXT_SUFFIX))
        for old in (b.tmp / name, b.tmp / f"{name}.data"):
            old.unlink(missing_ok=True)
        b.files = [f for f in dict.fromkeys(b.files + written) if (b.tmp / f).is_file()]
    for entry in config["model"]["decoder"]["pipeline"]:
        for stage in entry.values():
            stage["filename"] = compiled.get(stage["filename"], stage["filename"])
    genai_config.write(b.tmp, config)
    b.runtime.update(max_length=p.context_cap, context_length=p.context_cap)
    b.runtime["npu"] = {**settings.model_dump(), "kv_length": p.context_cap, "full_rotary_nodes": rewritten,
                        "context_binaries": sorted(compiled.values()), "provider_options": options}
    b.folder.reload()


def add_adapters(b: Build) -> None:
    """LoRA: the graph gets a float path with optional inputs beside each adapted MatMul, and each adapter its
    ONNX Runtime adapter file (build/lora_graph.py)."""
    adapters = b.plan.adapters
    if not adapters:
        return
    b.progress.step(f"LoRA: {len(adapters)} adapter(s) ({', '.join(a.name for a in adapters)}), "
                    f"{adapters[0].describe()}: a float path beside each adapted MatMul, off when none is active")
    inputs = lora_graph.add_lora_inputs(b.folder.decoder_file, adapters[0])
    for a in adapters:
        path = b.tmp / lora_graph.file_name(a.name)
        lora_graph.write_adapter(a, path, inputs)
        b.adapters.append(AdapterEntry(name=a.name, file=path.name, size_bytes=path.stat().st_size, sha256=sha256(path),
                                       source=str(a.path), rank=a.rank, alpha=a.alpha, scaling=a.scaling,
                                       modules=a.modules(), matrices=len(a.matrices)).model_dump())
    b.folder.reload()


def check(b: Build) -> None:
    """The files are whole, the graph suits the provider, it loads and generates here, it fits the device."""
    p = b.plan
    b.progress.step("checking the output")
    b.found = files.check_model_dir(b.folder)
    if p.target.checks is not None and b.graph is None:  # an NPU build's decoder graphs were checked before compiling
        b.graph = operators.check_graph(b.folder, p.target.execution_provider, p.target.checks)
    if p.target.runs_here:
        smoke_generate(b.tmp, adapters=[a.name for a in p.adapters])
    b.memory, warning = budget.check(budget.estimate(b.folder), p.target.device, p.target.name)
    if warning:
        b.progress.warn(warning)
    shutil.rmtree(b.work)


def numeric_validation(b: Build) -> None:
    """Against the checkpoint in transformers (where the target runs here): raise when a threshold fails."""
    p = b.plan
    if not (b.options.validate and p.target.runs_here):
        return
    b.progress.step(f"validating against {p.checkpoint.path} in transformers")
    b.report = validate(b.folder, p.checkpoint.path, p.precision, p.validation, target=p.target.name,
                        int4=p.int4 if p.precision == "int4" else None)
    b.report["built"] = str(b.out.resolve())
    b.report["adapters"] = {}
    for entry in b.adapters:  # each adapter active, against the checkpoint with PEFT applying it
        b.progress.step(f"validating adapter {entry['name']} against the checkpoint with PEFT applying "
                        f"{entry['source']}")
        report = validate(b.folder, p.checkpoint.path, p.precision, p.validation, target=p.target.name,
                          int4=p.int4 if p.precision == "int4" else None,
                          adapter=(entry["name"], Path(entry["source"])))
        report["built"] = f"{b.out.resolve()} with adapter {entry['name']}"
        b.report["adapters"][entry["name"]] = report
        entry["validation"] = validation_summary(report)
    (b.tmp / REPORT).write_text(json.dumps(reproducible(b.report), indent=2) + "\n")
    raise_on_failure(b.report)
    for report in b.report["adapters"].values():
        raise_on_failure(report)


def validation_summary(report: dict) -> dict:
    """What the build record keeps of a validation report."""
    return {"passed": report["passed"], "enforced": report["enforced"], "failures": report["failures"],
            **{k: v for k, v in report["metrics"].items() if k != "prompts"}, "dequantized": report["dequantized"]}


def write_record(b: Build) -> None:
    """The build record (artifacts.BuildRecord), saved in the folder."""
    p, report, runs_here = b.plan, b.report, b.plan.target.runs_here
    b.record = {
        "phiedge_version": __version__,
        "target": p.target.name,
        "recipe": p.recipe_name,
        "olive_passes": b.passes,
        "execution_provider": p.target.execution_provider,
        "bundle": p.target.bundle.model_dump(),
        "precision": p.precision,
        "int4": p.int4.model_dump() if p.precision == "int4" else None,
        "calibration": calibrate.describe(b.tmp / calibrate.IMPORTANCE),
        "runtime": b.runtime,
        "source": {"path": str(p.checkpoint.path), "name": p.checkpoint.name,
                   "hub": p.checkpoint.origin.model_dump() if p.checkpoint.origin else None,
                   "architecture": p.checkpoint.architecture,
                   "params": sum(math.prod(s) for s in parameter_shapes(p.checkpoint.config).values()),
                   "variant": p.checkpoint.variant, "shrunk": p.checkpoint.shrunk,
                   "notes": list(p.checkpoint.notes)},
        "fixes": {"layernorm_epsilon_nodes": b.fixed},
        "notes": list(p.notes),
        "checks": {"graph": b.graph, "loaded_here": runs_here, "numeric_validation": report is not None,
                   "not_run_here": None if runs_here else
                   f"{p.target.execution_provider} is not available on this machine: the graph was checked "
                   "against the provider's operator list and genai_config.json, not run",
                   "memory": b.memory},
        "validation": None if report is None else validation_summary(report),
        "files": sorted(b.found["files"] + [RECORD] + ([REPORT] if report else [])),
        "size_bytes": sum((b.tmp / f).stat().st_size for f in b.files),
        "weights": None if b.folder.stages else budget.weight_accounting(b.folder),
        "adapters": b.adapters,
        "build_seconds": round(time.perf_counter() - b.started, 1),
        "versions": stack_versions(tuple(r for r in p.target.bundle.requirements if r not in STACK)),
    }
    (b.tmp / RECORD).write_text(json.dumps(reproducible(b.record), indent=2) + "\n")


STAGES = (export, fix, compile_for_npu, add_adapters, check, numeric_validation, write_record)


def build(model_dir: str | Path, target_name: str, out: str | Path, options: BuildOptions = BuildOptions(),
          force: bool = False, progress: Progress | None = None, exports: Exports | None = None) -> dict:
    """Build, fix up, check and write the model folder; return the build record (also saved in it)."""
    progress = progress or Progress(quiet=True)
    p = plan(model_dir, target_name, options)
    out = Path(out)
    check_output(out, force)
    with staged_dir(out, force=force, progress=progress) as tmp:
        state = Build(p, options, out, tmp, progress, exports)
        for stage in STAGES:
            stage(state)
    progress.step(f"wrote {out}")
    return state.record
