"""What `phiedge build` will do, decided before anything runs: the target, the checkpoint and the user's
options resolved into one plan, with every problem of the options reported at once."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from phiedge import catalog
from phiedge.build import npu, olive_config
from phiedge.catalog import pydantic_problems
from phiedge.checkpoints import lora
from phiedge.checkpoints.checkpoint import Checkpoint
from phiedge.checkpoints.locate import locate
from phiedge.checkpoints.weights import Weights
from phiedge.checks.validate import with_overrides
from phiedge.errors import ConfigError, ModelError
from phiedge.quantize import prequant
from phiedge.schema import BLOCK_SIZES, Int4Settings, Target, ValidationSettings, int4_used, method_defaults


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
    revision: str | None = None  # branch, tag or commit when the model is a hub id
    adapters: tuple[tuple[str, str], ...] = ()  # (name, PEFT folder) of each LoRA adapter built beside the model


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
    adapters: tuple[lora.Adapter, ...] = ()

    @property
    def streamed(self) -> bool:
        return olive_config.streamed(self.precision, self.int4)

    def builder_input(self, workdir: Path) -> Path:
        """What the builder reads: the checkpoint, or phiedge's quantized copy of it (method stream)."""
        return workdir / "quantized" if self.streamed else self.checkpoint.path

    def olive_config(self, workdir: Path) -> dict:
        return olive_config.fill(self.recipe, self.target, self.builder_input(workdir), workdir, self.precision,
                                 self.int4)


# What method builder means for the stream-only settings: the builder's float table, 4-bit LM head, own rounding.
BUILDER_METHOD = {"method": "builder", **method_defaults("stream")}


def merge_int4(target: Int4Settings, overrides: dict, notes: list[str]) -> dict:
    """The target's int4 settings with the user's on top. Options only the builder's quantization has
    (another algorithm, float nodes, a shared table) switch a stream target to method builder, and method
    builder drops the stream-only table and LM head precisions the user did not ask for."""
    merged = {**target.model_dump(), **overrides}
    builder_only = [k for k in method_defaults("builder") if k in overrides and int4_used(k, overrides[k])]
    if "method" not in overrides and merged["method"] == "stream" and builder_only:
        merged["method"] = "builder"
        notes.append(f"int4 method builder: {', '.join(builder_only)} is the builder's quantization setting")
    if merged["method"] == "builder":
        merged.update({k: v for k, v in BUILDER_METHOD.items() if k not in overrides})
    if "quantizer" not in overrides and overrides.get("calibrate") is not None:
        if merged["calibrate"] and merged["quantizer"] == "rtn":  # --calibrate on a round-to-nearest target
            merged["quantizer"] = "mse"
        elif not merged["calibrate"] and merged["quantizer"] == "gptq":  # --no-calibrate: gptq has no inputs
            merged["quantizer"] = "mse"
            notes.append("int4 quantizer mse instead of the target's gptq, which needs the calibration")
    return merged


def plan(model_dir: str | Path, target_name: str, options: BuildOptions = BuildOptions()) -> Plan:
    """Resolve target, checkpoint (a folder, or a hub id fetched into the cache) and options; every option
    problem is reported at once."""
    target = catalog.find_target(target_name)
    checkpoint = locate(model_dir, options.revision)
    problems = []
    adapters = ()
    try:
        adapters = tuple(lora.read_all([(name, Path(folder)) for name, folder in options.adapters], checkpoint.config))
    except ModelError as exc:
        problems.append(str(exc))
    precision = options.precision or target.precision
    if precision not in target.provider.precisions:
        problems.append(f"precision {precision} is not available on {target.execution_provider} "
                        f"(choose {', '.join(target.provider.precisions)})")
    notes = []
    try:
        int4 = Int4Settings(**merge_int4(target.int4, options.int4, notes))
        int4_parsed = True
    except ValidationError as exc:
        problems.extend(f"int4 {p}" for p in pydantic_problems(exc))
        int4 = target.int4
        int4_parsed = False  # its problems are reported; the checks below would only repeat them
    cap = options.context_cap if options.context_cap is not None else target.context_cap
    if cap < 1:
        problems.append(f"context cap must be at least 1, not {cap}")
    elif target.npu is not None and cap <= target.npu.window:
        problems.append(f"context cap {cap} must exceed the NPU's prompt window ({target.npu.window} tokens): the KV "
                        "cache holds the padded prompt and the reply")
    if target.npu is not None:
        if adapters:
            problems.append(f"LoRA adapters are not built for {target.name}: its decoder is compiled into QNN context "
                            "binaries, which have no adapter inputs")
        if importlib.util.find_spec("onnxruntime_qnn") is None:
            problems.append(f"{target.name} needs ONNX Runtime's QNN provider: {npu.INSTALL} "
                            "(or pip install 'phiedge[npu]')")
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
    why = prequant.unsupported(checkpoint.config, checkpoint.path) if olive_config.streamed(precision, int4) else None
    if why and any(key in options.int4 for key in ("method", *method_defaults("stream"))):
        problems.append(f"int4 method stream: {why}")
    elif why:  # the target's default: fall back to the builder's own quantization of the fp32 graph
        int4 = int4.model_copy(update=BUILDER_METHOD)
        notes.append(f"int4 method builder instead of the target's stream: {why}")
    if olive_config.streamed(precision, int4) and int4.embeddings == prequant.SHARED \
            and not checkpoint.config.get("tie_word_embeddings"):
        untied = "the checkpoint's LM head is not its embedding table (tie_word_embeddings is false)"
        if "embeddings" in options.int4:
            problems.append(f"int4 embeddings shared: {untied}; choose int8 or int4")
        elif int4.eight_bit_rows:  # the target's split table: its 8-bit rows' closeness, in two tables
            int4 = int4.model_copy(update={"embeddings": "int8", "lm_head_bits": 8, "eight_bit_rows": 0.0})
            notes.append(f"int4 embeddings int8 and an 8-bit LM head instead of the target's split table: {untied}")
        else:  # the target's default: a table of its own at the LM head's bits
            int4 = int4.model_copy(update={"embeddings": f"int{int4.lm_head_bits}"})
            notes.append(f"int4 embeddings {int4.embeddings} instead of the target's shared: {untied}")
    widths = prequant.input_widths(checkpoint.config) if precision == "int4" and int4_parsed else []
    if any(w % int4.block_size for w in widths):
        uneven = (f"int4 block_size {int4.block_size} does not divide the checkpoint's matrix widths "
                  f"({', '.join(map(str, widths))})")
        if "block_size" in options.int4:
            problems.append(uneven)
        else:  # the target's default on a checkpoint of unusual widths (every published Phi's divide by 256)
            fit = max(b for b in BLOCK_SIZES if b <= int4.block_size and not any(w % b for w in widths))
            int4 = int4.model_copy(update={"block_size": fit})
            notes.append(f"{uneven}: block {fit} instead")
    if olive_config.streamed(precision, int4) and not why and int4.eight_bit:
        _, unmatched = prequant.eight_bit_matrices(Weights(checkpoint.path).names(), int4.eight_bit)
        problems.extend(f"int4 eight_bit pattern {p!r} matches no layer matrix of the checkpoint" for p in unmatched)
    recipe_name = options.recipe or target.recipe
    recipe = catalog.load_recipe(recipe_name)
    if olive_config.streamed(precision, int4) and olive_config.requantizing_passes(recipe):
        problems.append(f"recipe {recipe_name} quantizes with {', '.join(olive_config.requantizing_passes(recipe))}, "
                        "which int4 method stream has done already: add --int4-method builder")
    if problems:
        raise ConfigError("build options", problems)
    return Plan(target, checkpoint, precision, int4, cap, threads, recipe_name, recipe, validation, tuple(notes),
                adapters)
