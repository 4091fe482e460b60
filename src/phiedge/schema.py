"""One schema for every data file phiedge reads: variants, chat formats, targets, recipes.

Unknown keys are rejected everywhere, so a typo in a YAML file is an error, not a silently ignored
setting (olive-recipes' `info.yml` vs `info.yaml` drift is the cautionary tale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BLOCK_SIZES = (16, 32, 64, 128, 256)
ProviderName = Literal["cpu", "cuda", "dml", "webgpu", "qnn"]
Precision = Literal["int4", "fp32", "fp16"]


@dataclass(frozen=True)
class Provider:
    """What each tool calls an execution provider, and what phiedge can build for it."""

    onnxruntime: str  # ONNX Runtime's name (Olive's accelerators, OperatorKernels.md)
    olive_device: str  # Olive's accelerator device
    precisions: tuple[str, ...]  # what the model builder writes for it
    genai: str | None  # genai_config.json's session_options.provider_options key (CPU: none)
    runtime_package: str  # the onnxruntime-genai wheel that runs it


PROVIDERS: dict[str, Provider] = {
    "cpu": Provider("CPUExecutionProvider", "cpu", ("int4", "fp32"), None, "onnxruntime-genai"),
    "cuda": Provider("CUDAExecutionProvider", "gpu", ("int4", "fp16", "fp32"), "cuda", "onnxruntime-genai-cuda"),
    "dml": Provider("DmlExecutionProvider", "gpu", ("int4", "fp16"), "dml", "onnxruntime-genai-directml"),
    "webgpu": Provider("WebGpuExecutionProvider", "gpu", ("int4", "fp16", "fp32"), "webgpu", "onnxruntime-genai"),
    # a plugin provider: onnxruntime-qnn's library, registered by the runtime's host program (generate.py), never a path
    # from the model folder; on x86-64 Linux its HTP backend is Qualcomm's simulator
    "qnn": Provider("QNNExecutionProvider", "npu", ("int4",), "qnn", "onnxruntime-genai"),
}


def choices(model: type[BaseModel], name: str) -> list[str]:
    """The values a Literal field of a schema model allows, as text (for a command-line choice)."""
    return [str(v) for v in get_args(model.model_fields[name].annotation)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatFormat(Strict):
    """How a family of Phi models frames a conversation (the tokenizer's chat template)."""

    name: str
    description: str
    special_tokens: list[str] = Field(min_length=1, description="added tokens, in id order")
    text_tokens: list[str] = Field(default_factory=list, description="those of special_tokens the published tokenizer "
                                   "does not mark special, so that decoding writes them out (Phi-4-mini's tool "
                                   "markers, the reasoning models' <think>): what `phiedge serve` reads replies by")
    bos_token: str
    eos_tokens: list[str] = Field(min_length=1, description="tokens that end generation: generation_config.json's "
                                                             "eos_token_id list, in its order")
    eos_token: str | None = Field(None, description="config.json's and the tokenizer's eos (default: the first of "
                                                    "eos_tokens)")
    pad_token: str
    template: str = Field(description="Jinja chat template, as in tokenizer_config.json")
    split_pattern: str | None = Field(None, description="the regex the published tokenizer.json splits text with "
                                                        "before byte-level BPE, where it is not GPT-2's: written into "
                                                        "the tokenizer.json a build converts from vocab.json and "
                                                        "merges.txt (checkpoints/tokenizer_files.py)")

    @field_validator("split_pattern")
    @classmethod
    def _split_pattern_compiles(cls, pattern: str | None) -> str | None:
        from tokenizers import Regex  # the regex engine tokenizer.json's Split runs on (Oniguruma)

        if pattern is not None:
            try:
                Regex(pattern)
            except Exception as exc:  # tokenizers raises a plain Exception
                raise ValueError(f"split_pattern does not compile: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _tokens_are_special(self) -> ChatFormat:
        known = set(self.special_tokens)
        for token in [self.bos_token, self.pad_token, self.config_eos, *self.eos_tokens, *self.text_tokens]:
            if token not in known:
                raise ValueError(f"{token!r} is not among special_tokens")
        return self

    @property
    def config_eos(self) -> str:
        return self.eos_token or self.eos_tokens[0]


class Variant(Strict):
    """A published Phi model: its config.json values and what it is for."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    hf_id: str
    aliases: list[str] = []
    family: str
    params: int = Field(gt=0, description="parameter count of the published checkpoint")
    summary: str
    tasks: list[str] = Field(min_length=1)
    license: str
    buildable: bool
    reason: str | None = Field(None, description="why phiedge cannot build it yet")
    chat_format: str | None = Field(None, description="name of a file in variants/chat_formats")
    thinks: bool = Field(False, description="answers after reasoning inside <think>...</think> (phiedge serve "
                                            "returns that part as reasoning_content)")
    config: dict[str, Any] = Field(default_factory=dict, description="published config.json values")

    @model_validator(mode="after")
    def _buildable_has_config(self) -> Variant:
        if self.buildable:
            missing = [k for k in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size", "max_position_embeddings") if k not in self.config]
            if missing:
                raise ValueError(f"buildable variant lacks config keys: {', '.join(missing)}")
            if self.reason:
                raise ValueError("a buildable variant has no 'reason'")
        elif not self.reason:
            raise ValueError("a variant that is not buildable must say why ('reason')")
        return self


# Which int4 settings belong to which method, and each one's value when it is not used: the builder's own
# quantization reads the first three, phiedge's stream quantization the others. Read by the settings' check
# below and by the plan (plan.py), which switches method or drops what the other method would not read.
INT4_METHOD_KEYS: dict[str, tuple[str, Any]] = {
    "algorithm": ("builder", "default"),
    "float_nodes": ("builder", []),
    "shared_embeddings": ("builder", None),
    "embeddings": ("stream", "float"),
    "lm_head_bits": ("stream", 4),
    "quantizer": ("stream", "rtn"),
    "eight_bit": ("stream", []),
    "calibrate": ("stream", False),
    "eight_bit_rows": ("stream", 0.0),
}


def method_defaults(method: str) -> dict[str, Any]:
    """The settings only `method` reads, at their unused values."""
    return {k: unused for k, (owner, unused) in INT4_METHOD_KEYS.items() if owner == method}


def int4_used(key: str, value: Any) -> bool:
    """Whether a setting asks for something (False, None and the unused value ask for nothing)."""
    return value != INT4_METHOD_KEYS[key][1] and value is not None and value is not False


class Int4Settings(Strict):
    """MatMulNBits quantization as the ONNX Runtime GenAI model builder applies it."""

    block_size: int = Field(32, description="weights per scale; one of 16, 32, 64, 128, 256")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8")
    symmetric: bool = True
    algorithm: Literal["default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last"] = Field(
        "default", description="builder's int4_algo_config; *_last keep the LM head at 8 bits, k_quant_mixed "
                               "also some attention/MLP layers (llama.cpp's Q4_K_M choice)")
    shared_embeddings: bool | None = Field(
        None, description="embedding table shares the quantized LM head (None: the builder's choice)")
    float_nodes: list[str] = Field(
        default_factory=list, description="MatMul nodes kept unquantized, e.g. /lm_head/MatMul")
    method: Literal["builder", "stream"] = Field(
        "builder", description="builder: the builder exports fp32 and quantizes the whole graph (memory grows "
                               "~0.85 GB a layer at Phi-4-mini's widths); stream: phiedge quantizes one matrix at a "
                               "time from the memory-mapped checkpoint with the same ONNX Runtime kernel and the "
                               "builder reads the quantized checkpoint (Phi-3 family)")
    embeddings: Literal["float", "int8", "int4", "shared"] = Field(
        "float", description="input embedding table: float, GatherBlockQuantized at 8 or 4 bits, or shared: the "
                             "LM head's quantized matrix at lm_head_bits, stored once (tied checkpoints; stream only)")
    lm_head_bits: Literal[4, 8] = Field(4, description="bits of the LM head's MatMulNBits (8: stream only)")
    eight_bit: list[str] = Field(
        default_factory=list, description="layer matrices kept at 8 bits, as fnmatch patterns of their checkpoint "
                                          "names without .weight, e.g. model.layers.0.mlp.down_proj or "
                                          "model.layers.*.self_attn.qkv_proj (stream only; the LM head has "
                                          "lm_head_bits, the table embeddings)")
    eight_bit_rows: float = Field(
        0.0, ge=0, lt=1, description="share of a shared 4-bit table's rows kept at 8 bits: the tokens the "
                                     "calibrated checkpoint gives the most probability, which carry most of "
                                     "the LM head's error (needs embeddings shared, lm_head_bits 4, calibrate)")
    quantizer: Literal["rtn", "mse", "gptq"] = Field(
        "rtn", description="how method stream rounds each matrix: rtn, ONNX Runtime's round to nearest with the "
                           "block's absolute maximum as scale; mse, the scale (and zero point) of least squared "
                           "error, never worse than rtn's for any block; gptq, each column's rounding error "
                           "compensated by the columns after it, from the calibration's input second moments "
                           "(needs calibrate; blocks' scales by mse). Stream only; same bytes and kernels")
    calibrate: bool = Field(
        False, description="run the checkpoint over calibration text one decoder layer at a time and weight the "
                           "quantizer by each Linear's inputs: their mean squares weight the mse search "
                           "(llama.cpp's importance matrix), their second-moment matrices drive gptq (stream "
                           "with quantizer mse or gptq)")

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {v}")
        return v

    @model_validator(mode="after")
    def _method(self) -> "Int4Settings":
        if self.method == "builder":
            if any(int4_used(k, getattr(self, k)) for k in method_defaults("stream")):
                raise ValueError("embeddings int8/int4/shared, lm_head_bits 8, quantizer mse, eight_bit, "
                                 "eight_bit_rows and calibrate need method: stream (with the builder, use algorithm "
                                 "rtn_last for an 8-bit LM head)")
            return self
        problems = []
        if self.algorithm != "default":
            problems.append("algorithm default (it runs the default path's kernel)")
        if self.float_nodes:
            problems.append("no float_nodes")
        if self.shared_embeddings:
            problems.append("separate embeddings (set embeddings: int4, int8 or shared instead)")
        if problems:
            raise ValueError("method stream needs " + ", ".join(problems) + " (or choose method builder)")
        if self.calibrate and self.quantizer == "rtn":
            raise ValueError("calibrate weights the quantizer: it needs quantizer mse or gptq "
                             "(rtn has nothing to weight)")
        if self.quantizer == "gptq" and not self.calibrate:
            raise ValueError("quantizer gptq needs calibrate: it is driven by the inputs' second moments")
        if self.eight_bit_rows and (self.embeddings != "shared" or self.lm_head_bits != 4 or not self.calibrate):
            raise ValueError("eight_bit_rows splits a shared 4-bit table by the calibration's output probabilities: "
                             "it needs embeddings shared, lm_head_bits 4 and calibrate")
        if self.embeddings == "shared" and self.lm_head_bits == 4 and not self.symmetric:
            raise ValueError("a shared 4-bit table must be symmetric: GatherBlockQuantized cannot read "
                             "MatMulNBits' packed 4-bit zero points (8 bits can)")
        return self


class Thresholds(Strict):
    """Limits a built model must meet against its reference; None leaves a metric unchecked."""

    MINIMA: ClassVar[frozenset[str]] = frozenset({"top1", "greedy"})

    kl_mean: float | None = Field(None, gt=0, description="max mean KL(reference || built) per position")
    kl_p99: float | None = Field(None, gt=0, description="max 99th percentile of the per-position KL")
    top1: float | None = Field(None, ge=0, le=1, description="min share of positions with the same top token")
    ppl_ratio: float | None = Field(None, ge=1, description="max perplexity(built) / perplexity(reference)")
    greedy: float | None = Field(None, ge=0, le=1, description="min share of prompts with identical greedy tokens")


class DequantizedSettings(Strict):
    """The int4 method-stream build against the checkpoint carrying the weights phiedge quantized for it
    (checks/dequantized.py): only kernel arithmetic may differ, so the limit holds on every checkpoint."""

    eval_tokens: int = Field(512, ge=16, description="first held-out tokens compared")
    logits_rel_rms: float | None = Field(
        0.08, gt=0, description="max relative RMS error of the centred logits (healthy builds measured 0.005 "
                                "to 0.034, broken ones 0.11 and up: benchmarks/RESULTS.md)")

    def maxima(self) -> dict[str, float | None]:
        return {"logits_rel_rms": self.logits_rel_rms}


class ValidationSettings(Strict):
    eval_tokens: int = Field(2048, ge=16, description="held-out tokens scored for KL, top-1 and perplexity")
    window: int = Field(512, ge=8, description="tokens per forward pass")
    greedy_tokens: int = Field(32, ge=1, description="new tokens per greedy prompt")
    thresholds: dict[Precision, Thresholds] = {}
    dequantized: DequantizedSettings = DequantizedSettings()


class Bundle(Strict):
    """How the bundle is laid out for the platform's apps, and what its runtime needs."""

    layout: Literal["flat", "android", "ios", "windows", "windows-npu", "android-npu"] = Field(
        "flat", description="flat: model/ + generate.py; android: app assets + Kotlin; ios: Xcode resources + "
                            "Swift; windows: model/ + PowerShell runner; windows-npu, android-npu: the same for "
                            "a Snapdragon NPU")
    requirements: list[str] = Field(default_factory=lambda: ["onnxruntime-genai"],
                                    description="pip packages of the runtime (no version: the build's is added)")


class Device(Strict):
    """The device class a target is for: its memory decides the context cap and the budget check."""

    ram_gb: float = Field(gt=0, description="RAM (or GPU memory) of the smallest device of the class, GB")
    budget: float = Field(0.5, gt=0, le=1, description="share of it the model may take (weights + KV cache)")


class GraphChecks(Strict):
    """What a build for this target is checked against, when it cannot all run here."""

    max_opset: int = Field(ge=7, description="highest ai.onnx opset the target's ONNX Runtime implements")
    operators: str = Field(description="operator list under targets/operators/ (the provider's kernels)")
    numeric: bool = Field(description="the graph runs on this machine's CPU provider, so validation runs")
    simulated: bool = Field(False, description="it runs here on a simulator of the device (QNN's HTP): validated, "
                                               "but its speed here is not the device's, so releases do not bench it")


class OperatorKernel(Strict):
    since: list[int] = Field(min_length=1, description="opset versions at which kernels were registered")
    until: int | None = Field(None, description="last opset of the newest kernel, when its range is closed")
    types: dict[str, list[str]] = Field(default_factory=dict, description="type constraints of the newest kernel")
    types_by_since: dict[int, dict[str, list[str]]] | None = Field(
        None, description="type constraints of each kernel, where older ones differ")

    def covers(self, version: int, exact: bool) -> int | None:
        """The registration serving an operator of this schema version, if any."""
        if exact:
            return version if version in self.since else None
        starts = [s for s in self.since if s <= version]
        if not starts or (self.until is not None and version > self.until and max(starts) == max(self.since)):
            return None
        return max(starts)

    def types_at(self, registration: int) -> dict[str, list[str]]:
        return (self.types_by_since or {}).get(registration, self.types)


class OperatorSet(Strict):
    """The kernels an execution provider implements, as listed by ONNX Runtime's OperatorKernels.md."""

    provider: str
    source: str = Field(description="where the list was taken from (URL at a commit or version)")
    exact_versions: bool = Field(False, description="the provider runs a kernel only for the exact schema "
                                                    "version it was registered at (DirectML)")
    domains: dict[str, dict[str, OperatorKernel]]


class NpuSettings(Strict):
    """A static-shape graph for an NPU (Olive's StaticLLM) and the Qualcomm HTP it is compiled for."""

    window: int = Field(64, ge=8, description="prompt tokens per run of the context model (the static prefill length); "
                                              "the KV cache is the context cap")
    htp_arch: int = Field(73, ge=68, description="Hexagon architecture the context binaries are compiled for")
    soc_model: int = Field(60, ge=0, description="QNN's SoC id (60: SC8380XP, Snapdragon X Elite)")


class Target(Strict):
    """A device class: how a model must be built to run well there."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    description: str
    execution_provider: ProviderName
    precision: Precision
    int4: Int4Settings = Int4Settings()
    context_cap: int = Field(gt=0, description="search.max_length written into genai_config.json")
    threads: int | Literal["auto"] = Field("auto", description="intra-op threads; auto = the build machine's cores")
    recipe: str = Field(description="path of the Olive workflow under recipes/, without extension")
    validation: ValidationSettings = ValidationSettings()
    bundle: Bundle = Bundle()
    device: Device | None = Field(None, description="memory class of the device (None: no budget check)")
    checks: GraphChecks | None = Field(None, description="graph checks for a runtime that is not here")
    npu: NpuSettings | None = Field(None, description="static shapes and the NPU they are compiled for (qnn only)")

    @model_validator(mode="after")
    def _npu_is_qnn(self) -> Target:
        if (self.npu is not None) != (self.execution_provider == "qnn"):
            raise ValueError("npu settings go with execution_provider qnn, and qnn needs them")
        if self.npu is not None and self.context_cap <= self.npu.window:
            raise ValueError(f"context_cap {self.context_cap} must exceed npu.window {self.npu.window}: the prompt is "
                             "padded to a whole window before the first new token")
        if self.npu is not None and self.validation.window > self.npu.window:
            raise ValueError(f"validation.window {self.validation.window} must not exceed npu.window "
                             f"{self.npu.window}: a static model takes one window of prompt at a time")
        return self

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("threads must be at least 1 or 'auto'")
        return v

    @property
    def provider(self) -> Provider:
        return PROVIDERS[self.execution_provider]

    @property
    def embedding_table(self) -> str:
        """The embedding lookup's precision: int4 on an NPU graph (its builder quantizes the Gather too,
        build/olive_config.py), else the int4 settings' `embeddings`."""
        return "int4" if self.npu is not None else self.int4.embeddings

    @property
    def runs_here(self) -> bool:
        """Whether a build for this target runs on this machine's CPU provider (so it is loaded and validated)."""
        return self.checks is None or self.checks.numeric


# ModelBuilder extra options the builder reads as booleans. Olive hands them over without the parsing the
# builder's own command line does, so the string "false" would count as true.
BOOLEAN_BUILDER_OPTIONS = {"int4_is_symmetric", "exclude_embeds", "exclude_lm_head", "include_hidden_states",
                           "enable_cuda_graph", "enable_webgpu_graph", "use_qdq", "use_webgpu_fp32",
                           "use_cuda_bf16", "shared_embeddings", "hf_remote", "disable_qkv_fusion", "prune_lm_head"}


class OlivePass(BaseModel):
    """A pass's own options are Olive's to check; phiedge needs its type, and checks the builder's booleans."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str

    @model_validator(mode="after")
    def _builder_booleans(self) -> OlivePass:
        extra = (self.model_extra or {}).get("extra_options") or {}
        if not isinstance(extra, dict):
            raise ValueError("extra_options must be a mapping")
        wrong = [f"extra_options.{k} must be true or false, not {v!r}" for k, v in extra.items()
                 if k in BOOLEAN_BUILDER_OPTIONS and not isinstance(v, bool)]
        if self.type == "ModelBuilder" and wrong:
            raise ValueError("; ".join(wrong))
        return self


class OliveInputModel(Strict):
    type: Literal["HfModel"]
    model_path: str | None = Field(None, description="left empty in recipes: phiedge fills it")
    load_kwargs: dict[str, Any] | None = None


# Where a workflow runs: phiedge writes them from the target's provider (build/olive_config.py); without them
# plain `olive run --config` uses Olive's default, a local CPU system.
ACCELERATOR_KEYS = ("systems", "host", "target")


class Recipe(Strict):
    """The subset of an Olive workflow config that phiedge recipes may use."""

    input_model: OliveInputModel
    passes: dict[str, OlivePass] = Field(min_length=1)
    data_configs: list[dict[str, Any]] | None = None
    log_severity_level: int = 1
    output_dir: str | None = None
    cache_dir: str | None = None
    evaluate_input_model: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_accelerator(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in ACCELERATOR_KEYS):
            raise ValueError(f"{', '.join(k for k in ACCELERATOR_KEYS if k in data)}: the system and its accelerator "
                             "are the target's (its execution_provider), not the recipe's")
        return data

    @model_validator(mode="after")
    def _one_builder(self) -> Recipe:
        if not any(p.type == "ModelBuilder" for p in self.passes.values()):
            raise ValueError("a recipe needs a ModelBuilder pass (it writes genai_config.json)")
        int4 = sorted(f"{name}.{key}" for name, p in self.passes.items() if p.type == "ModelBuilder"
                      for key in p.model_extra or {} if key.startswith("int4_"))
        if int4:  # phiedge writes them from the target's (and the options') int4 settings, over whatever is here
            raise ValueError(f"{', '.join(int4)}: int4 settings belong to the target's int4 block, not the recipe")
        return self
