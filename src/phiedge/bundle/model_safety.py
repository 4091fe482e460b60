"""What a model folder may ask of onnxruntime-genai, checked before anything in it is loaded.

genai_config.json can name a native library the runtime loads (`session_options.custom_ops_library`),
execution providers whose options name libraries of their own, and model files anywhere on the
machine; an ONNX file can point its weights at any path. A bundle's manifest proves only that its
files are the ones its maker listed, so every phiedge command that opens a model folder (verify, run,
bench, validate, build's smoke test) goes through `check_model_folder` or `load`: genai_config.json may
hold only the keys the model builder and phiedge write, with values of their types, provider options
only for the target's provider, and every file named stays inside the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, ValidationError

from phiedge import catalog
from phiedge.artifacts import GENAI_CONFIG as FILE
from phiedge.artifacts import RECORD, BuildRecord, read
from phiedge.bundle.generate import load as load_genai
from phiedge.errors import UnsafeModelError
from phiedge.schema import PROVIDERS, Strict


class SessionOptions(Strict):
    log_id: str | None = None
    provider_options: list[dict[str, dict[str, str]]] = []
    intra_op_num_threads: int | None = Field(None, ge=0)


class DecoderInputs(Strict):
    input_ids: str | None = None
    past_sequence_length: str | None = None  # a static NPU pipeline's (Olive's StaticLLM)
    total_sequence_length: str | None = None
    inputs_embeds: str | None = None
    attention_mask: str | None = None
    position_ids: str | None = None
    past_key_names: str | None = None
    past_value_names: str | None = None


class DecoderOutputs(Strict):
    logits: str | None = None
    present_key_names: str | None = None
    present_value_names: str | None = None


class PipelineModel(Strict):
    """One model of a decoder pipeline (an NPU build: embeddings, context, iterator, LM head)."""

    filename: str
    inputs: list[str] = []
    outputs: list[str] = []
    session_options: SessionOptions = SessionOptions()
    run_on_prompt: bool | None = None
    run_on_token_gen: bool | None = None
    is_lm_head: bool | None = None


class SlidingWindow(Strict):
    window_size: int = Field(ge=1)
    pad_value: int = 0
    alignment: Literal["left", "right"] = "left"
    slide_key_value_cache: bool = False


class Decoder(Strict):
    session_options: SessionOptions = SessionOptions()
    filename: str | None = None
    pipeline: list[dict[str, PipelineModel]] | None = None
    sliding_window: SlidingWindow | None = None
    head_size: int | None = None
    hidden_size: int | None = None
    inputs: DecoderInputs | None = None
    outputs: DecoderOutputs | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    num_key_value_heads: int | None = None


class ModelSection(Strict):
    bos_token_id: int | None = None
    context_length: int | None = None
    decoder: Decoder = Decoder()
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    type: str | None = None
    vocab_size: int | None = None


class Search(Strict):
    diversity_penalty: float | None = None
    do_sample: bool | None = None
    early_stopping: bool | None = None
    length_penalty: float | None = None
    max_length: int | None = None
    min_length: int | None = None
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    num_return_sequences: int | None = None
    past_present_share_buffer: bool | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


class GenaiConfig(Strict):
    """genai_config.json as the model builder (make_genai_config) and genai_config.apply_runtime write it."""

    model: ModelSection = ModelSection()
    search: Search = Search()


def problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"])) or "(top)"
    if error["type"] == "extra_forbidden":
        return f"{where} is not a setting phiedge writes"
    return f"{where}: {error['msg']}"


def outside(path: Path, model_dir: Path) -> bool:
    """Whether path, with every link followed, ends outside model_dir (a link loop counts as outside)."""
    try:
        return not path.resolve().is_relative_to(model_dir.resolve())
    except (OSError, RuntimeError):
        return True


def leaves(model_dir: Path, base: Path, rel) -> bool:
    """Whether a path a file names is anything but a plain relative name that resolves inside model_dir."""
    if not isinstance(rel, str) or not rel or any(c in rel for c in ("\\", ":", "\0")):
        return True
    path = PurePosixPath(rel)
    return path.is_absolute() or ".." in path.parts or outside(base / rel, model_dir)


def recorded_provider(model_dir: Path) -> str | None:
    """The execution provider phiedge_build.json names, if the folder has one (a malformed one: ArtifactError)."""
    path = model_dir / RECORD
    return read(BuildRecord, path).execution_provider if path.is_file() else None  # malformed: ArtifactError


def number(value: str) -> bool:
    return re.fullmatch(r"[0-9]{1,4}", value) is not None


# The provider options phiedge writes (build/npu.py), each with the values it may take. Never a library path
# (`backend_path`): the QNN backend is the installed provider's own, chosen by type.
PROVIDER_SETTINGS = {"qnn": {"backend_type": lambda v: v == "htp", "htp_arch": number, "soc_model": number}}

# What an EPContext node (a model compiled for the NPU: build/npu.py) may say, as ONNX Runtime's ModelCompiler
# writes it for QNN: its binary in a file beside the model (embed_mode 0), nothing that points the provider at
# another kind of context (QNN's `ep_context_type`/`ep_dlc_context`, read by its Genie path) or another provider.
EP_CONTEXT = {"main_context": lambda v: v in (0, 1), "embed_mode": lambda v: v == 0, "ep_cache_context": None,
              "source": lambda v: v in (b"QNNExecutionProvider", b"QNN"), "ep_sdk_version": lambda v: True,
              "partition_name": lambda v: True, "is_multi_soc_ep_context": lambda v: v == 0,
              "max_size": lambda v: True}


def check_providers(where: Path, options: list[dict], provider: str | None) -> None:
    """Each provider_options entry names the target's provider (any phiedge target's when unknown), with
    only the options phiedge writes for it: none for the builder's providers, the HTP's for QNN."""
    known = {t.execution_provider for t in catalog.targets().values()}
    if provider is not None and (not isinstance(provider, str) or provider not in known):
        raise UnsafeModelError(f"{where}: execution provider {provider!r} is not one phiedge builds for "
                               f"({', '.join(sorted(known))})")
    allowed = {PROVIDERS[p].genai for p in ([provider] if provider else known)} - {None}
    for entry in options:
        for name, settings in entry.items():
            if name not in allowed:
                raise UnsafeModelError(f"{where}: provider_options names {name!r}; the target's provider "
                                       f"({provider or 'any phiedge target'}) allows {sorted(allowed) or 'none'}")
            allowed_settings = PROVIDER_SETTINGS.get(name, {})
            unknown = sorted(k for k, v in settings.items() if k not in allowed_settings or not allowed_settings[k](v))
            if unknown:
                raise UnsafeModelError(f"{where}: provider_options.{name} sets {', '.join(unknown)} "
                                       f"({', '.join(repr(settings[k]) for k in unknown)}), which phiedge never writes")


def tensors(message):
    """Every TensorProto anywhere in an ONNX message: initializers, attributes, subgraphs, functions."""
    import onnx
    from google.protobuf.message import Message

    if isinstance(message, onnx.TensorProto):
        yield message
        return
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in [value] if isinstance(value, Message) else value:
                yield from tensors(item)


def check_ep_context(model_dir: Path, onnx_path: Path, node) -> None:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    wrong = sorted(k for k, v in attrs.items() if k not in EP_CONTEXT or (EP_CONTEXT[k] and not EP_CONTEXT[k](v)))
    if wrong or attrs.get("embed_mode") != 0:
        raise UnsafeModelError(f"{onnx_path}: EPContext node {node.name!r} sets {', '.join(wrong) or 'no embed_mode 0'}"
                               ", which phiedge never writes")
    cache = attrs.get("ep_cache_context", b"")
    cache = cache.decode("utf-8", "replace") if isinstance(cache, bytes) else ""
    if leaves(model_dir, onnx_path.parent, cache):
        raise UnsafeModelError(f"{onnx_path}: EPContext node {node.name!r} reads its context binary from "
                               f"{cache!r}, not a file inside the model folder")


def check_external_data(model_dir: Path, onnx_path: Path) -> None:
    """Every external tensor's location is a plain relative name inside the model folder."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base class
        raise UnsafeModelError(f"{onnx_path}: not a readable ONNX file ({exc})") from None
    for node in model.graph.node:  # a compiled NPU model: its QNN context binary is a file beside it
        if node.op_type == "EPContext":
            check_ep_context(model_dir, onnx_path, node)
    for tensor in tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if leaves(model_dir, onnx_path.parent, location):
            raise UnsafeModelError(f"{onnx_path}: tensor {tensor.name!r} keeps its data at {location!r}, "
                                   "outside the model folder")


def check_model_folder(model_dir: str | Path, provider: str | None = None) -> None:
    """Raise UnsafeModelError, naming the key or file, unless the folder asks only for what phiedge writes.

    provider: the target's execution provider (a bundle's manifest); phiedge_build.json's when not given.
    """
    model_dir = Path(model_dir)
    where = model_dir / FILE
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UnsafeModelError(f"{where} is missing or not JSON") from None
    try:
        config = GenaiConfig.model_validate(raw)
    except ValidationError as exc:
        raise UnsafeModelError(f"{where}: " + "; ".join(problem(e) for e in exc.errors())) from None
    decoder = config.model.decoder
    provider = provider or recorded_provider(model_dir)
    check_providers(where, decoder.session_options.provider_options, provider)
    if decoder.filename is not None and leaves(model_dir, model_dir, decoder.filename):
        raise UnsafeModelError(f"{where}: model.decoder.filename {decoder.filename!r} is not a file inside the "
                               "model folder")
    for entry in decoder.pipeline or []:
        for name, stage in entry.items():
            check_providers(where, stage.session_options.provider_options, provider)
            if leaves(model_dir, model_dir, stage.filename):
                raise UnsafeModelError(f"{where}: model.decoder.pipeline {name}.filename {stage.filename!r} is not a "
                                       "file inside the model folder")
    for entry in sorted(model_dir.rglob("*")):
        if entry.is_symlink() and outside(entry, model_dir):
            raise UnsafeModelError(f"{entry} links outside the model folder")
    onnx_files = {p for p in model_dir.rglob("*.onnx") if p.is_file()}
    named = [decoder.filename] + [stage.filename for entry in decoder.pipeline or [] for stage in entry.values()]
    onnx_files |= {model_dir / name for name in named if name is not None and (model_dir / name).is_file()}
    for onnx_path in sorted(onnx_files):
        check_external_data(model_dir, onnx_path)


def load(model_dir: str | Path, threads: int | None = None):
    """generate.load after check_model_folder: the way phiedge itself opens a model folder for inference.

    generate.py is copied into bundles and needs only onnxruntime-genai, so the check lives here.
    """
    check_model_folder(model_dir)
    return load_genai(str(model_dir), threads)
