"""The files phiedge writes into a model folder and a bundle: their names, their shapes, and one way in.

Writers (build, validate, package) and readers (package, validate, verify, bench, run, release) both
import this module and never each other, so a reader does not drag in the pipeline that wrote the file,
and a record that was edited, truncated or written by another version is one line, never a KeyError.

The build record and the validation report are phiedge's own notes about a build: unknown keys are kept
(a newer phiedge may add some), the keys readers use are typed. The manifest decides what `verify`
believes, so it is strict: every key known, every file entry exactly a size and a SHA-256, every path
inside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from phiedge import genai_config
from phiedge.errors import ArtifactError, BundleError

RECORD = "phiedge_build.json"  # the build record, in the model folder
REPORT = "validation.json"  # the validation report, in the model folder when the build validated
WEIGHTS = "phiedge_weights.json"  # the quantized matrices' digests, in an int4 method-stream model folder
GENAI_CONFIG = genai_config.FILE  # the model builder's, edited by phiedge (genai_config.apply_runtime)
MANIFEST = "manifest.json"  # at a bundle's root
SIGNATURE = "manifest.json.minisig"  # minisign's own name for a detached signature of manifest.json
FORMAT = "phiedge-bundle/1"
CHUNK = 1 << 20

M = TypeVar("M", bound=BaseModel)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())


class Lenient(BaseModel):
    """phiedge's own notes: typed where read, other keys kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the build record (phiedge_build.json) -------------------------------------------------------------------

class HubOrigin(Closed):
    """Where a checkpoint came from on the Hugging Face hub (checkpoints/hub.py): also `phiedge fetch`'s
    phiedge_origin.json in the folder it fills."""

    repo_id: StrictStr
    revision: StrictStr | None = None  # as asked for (a branch, tag or commit), when known
    commit: StrictStr | None = None  # what it resolved to


class Source(Lenient):
    name: str | None = None
    hub: HubOrigin | None = None
    architecture: str | None = None
    params: int | None = None
    variant: str | None = None
    shrunk: bool | None = None
    notes: list[str] = []


class TokenizerConversion(Closed):
    """How a build made tokenizer.json from a checkpoint's vocab.json and merges.txt (checkpoints/tokenizer_files)."""

    converted_from: list[str]
    split_pattern: str | None  # the regex text is split with before byte-level BPE; None: GPT-2's
    split_from: str  # where the pattern came from


class Runtime(Lenient):
    max_length: int
    context_length: int | None = None
    intra_op_num_threads: int
    generation: dict = {}  # the checkpoint's stop tokens and sampling defaults, as written (genai_config)
    tokenizer: TokenizerConversion | None = None  # how tokenizer.json was made from vocab.json and merges.txt


class Checks(Closed):
    """What the build checked, and why the model did not run here when it did not (verify then skips loading)."""

    graph: dict[str, Any] | None = None
    loaded_here: bool | None = None
    numeric_validation: bool | None = None
    not_run_here: str | None = None
    memory: dict[str, Any] | None = None


class AdapterEntry(Closed):
    """One LoRA adapter of a build (build/lora_graph.py): its file in the model folder, where it came from, its
    layout (shared by every adapter of the build), and its validation against transformers with PEFT."""

    name: StrictStr
    file: StrictStr  # NAME.onnx_adapter, beside the model
    size_bytes: StrictInt
    sha256: StrictStr
    source: StrictStr  # the PEFT folder it was made from
    rank: StrictInt
    alpha: float
    scaling: float
    modules: list[StrictStr]
    matrices: StrictInt
    validation: dict[str, Any] | None = None


class BuildRecord(Lenient):
    phiedge_version: str
    target: str
    recipe: str
    execution_provider: str
    precision: str
    olive_passes: list[str] = []
    bundle: dict[str, Any] | None = None
    int4: dict[str, Any] | None = None
    runtime: Runtime
    source: Source = Source()
    checks: Checks | None = None
    validation: dict[str, Any] | None = None
    files: list[str] = []
    size_bytes: int | None = None
    weights: dict[str, Any] | None = None
    adapters: list[AdapterEntry] = []
    versions: dict[str, str]


# --- the validation report (validation.json) -----------------------------------------------------------------

class Metrics(Lenient):
    kl_mean: float
    kl_p99: float
    top1: float
    ppl_ratio: float


class ValidationReport(Lenient):
    built: str | None = None
    reference: str | None = None
    precision: str | None = None
    target: str | None = None
    metrics: Metrics
    failures: list[str] = []
    enforced: bool
    dequantized: dict[str, Any] | None = None
    passed: bool | None
    note: str | None = None


# --- the quantized weights' digests (phiedge_weights.json) ----------------------------------------------------

class WeightDigests(Closed):
    """What phiedge quantized for an int4 method-stream build: each matrix (checkpoint name without .weight;
    model.embed_tokens for a table of its own or the shared one) by the SHA-256 of its packed weight, scales and
    zero points in the checkpoint's row order (quantizer.digest). The dequantized check reads the weights from
    the graph and holds them to these digests."""
    block_size: StrictInt
    symmetric: bool
    matrices: dict[str, StrictStr]


# --- the bundle manifest (manifest.json) ---------------------------------------------------------------------

def inside(rel: str) -> str:
    """A manifest path, refused unless it is relative and stays inside the bundle."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or ":" in path.parts[0]:
        raise ValueError(f"manifest path {rel!r} leaves the bundle (or is not a path)")
    return rel


class FileEntry(Closed):
    size: StrictInt
    sha256: StrictStr


class MinRuntime(Closed):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    onnxruntime_genai: StrictStr = Field(alias="onnxruntime-genai")


class Manifest(Closed):
    format: Literal["phiedge-bundle/1"]
    name: StrictStr
    phiedge_version: StrictStr | None = None
    target: StrictStr | None = None
    recipe: StrictStr | None = None
    execution_provider: StrictStr | None = None
    layout: StrictStr | None = None
    model_dir: StrictStr = "model"
    model: dict[str, Any] | None = None
    context_cap: StrictInt | None = None
    threads: StrictInt | None = None
    versions: dict[str, StrictStr] | None = None
    min_runtime: MinRuntime
    validation: dict[str, Any] | None = None
    checks: Checks | None = None
    adapters: dict[StrictStr, dict[str, Any]] | None = None  # LoRA adapter name -> its file (in files), layout, numbers
    files: dict[str, FileEntry]

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, v: str) -> str:
        return inside(v)

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in v:
            inside(rel)
        return v


# --- reading ---------------------------------------------------------------------------------------------------

def parse(model: type[M], text: str | bytes, where: str | Path, error: type[Exception] = ArtifactError) -> M:
    """A file's text, parsed and shape-checked: whatever it holds, one `error` naming the file, or the model."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise error(f"{where}: not JSON") from None
    if not isinstance(data, dict):
        raise error(f"{where}: not a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"{where}: {problems(exc)}") from None


def read(model: type[M], path: Path, error: type[Exception] = ArtifactError) -> M:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from None
    return parse(model, text, path, error)


def parse_manifest(text: str | bytes, where: str | Path) -> Manifest:
    """A manifest's bytes (as a signature covers them), parsed: a BundleError or a manifest to believe."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{where}: not JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not a {FORMAT} manifest")
    return parse(Manifest, text, where, BundleError)


@dataclass
class ModelFolder:
    """A model folder ONNX Runtime GenAI loads: what the stages after the export read of it, read once.

    `config` is read again after `reload()` (genai_config.apply_runtime and the graph fixes edit the files)."""

    path: Path
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)

    def reload(self) -> None:
        self._cache.clear()

    @property
    def config(self) -> dict:
        if "config" not in self._cache:
            self._cache["config"] = genai_config.read(self.path)
        return self._cache["config"]

    @property
    def decoder(self) -> dict:
        decoder = (self.config.get("model") or {}).get("decoder") if isinstance(self.config, dict) else None
        if not isinstance(decoder, dict) or not (isinstance(decoder.get("filename"), str) or self.stages):
            raise ArtifactError(f"{self.path / GENAI_CONFIG} names no model.decoder.filename")
        return decoder

    @property
    def stages(self) -> list[dict]:
        """A decoder-pipeline model's stages in run order (an NPU build: embeddings, context, iterator, LM head),
        each with its `name`; [] for a model of one decoder file."""
        decoder = (self.config.get("model") or {}).get("decoder") if isinstance(self.config, dict) else None
        pipeline = decoder.get("pipeline") if isinstance(decoder, dict) else None
        if not isinstance(pipeline, list):
            return []
        return [{**stage, "name": name} for entry in pipeline if isinstance(entry, dict)
                for name, stage in entry.items() if isinstance(stage, dict) and isinstance(stage.get("filename"), str)]

    @property
    def decoder_name(self) -> str:
        """The decoder's file; in a pipeline, the model that decodes one token at a time (not run on the prompt)."""
        if "filename" in self.decoder:
            return self.decoder["filename"]
        decoding = [s["filename"] for s in self.stages if s.get("run_on_prompt") is False]
        return (decoding or [self.stages[-1]["filename"]])[0]

    @property
    def model_names(self) -> list[str]:
        """Every ONNX file genai_config.json names."""
        return [s["filename"] for s in self.stages] or [self.decoder_name]

    @property
    def decoder_file(self) -> Path:
        return self.path / self.decoder_name

    @property
    def graph(self):
        """The decoder's ONNX graph without its external weights (what every check reads)."""
        if "graph" not in self._cache:
            import onnx

            self._cache["graph"] = onnx.load(str(self.decoder_file), load_external_data=False)
        return self._cache["graph"]

    @property
    def record(self) -> BuildRecord | None:
        """The build record, None in a folder phiedge did not build; ArtifactError when it is malformed."""
        if "record" not in self._cache:
            path = self.path / RECORD
            self._cache["record"] = read(BuildRecord, path) if path.is_file() else None
        return self._cache["record"]

    @property
    def report(self) -> ValidationReport | None:
        if "report" not in self._cache:
            path = self.path / REPORT
            self._cache["report"] = read(ValidationReport, path) if path.is_file() else None
        return self._cache["report"]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def safe_extract(archive: Path, dest: Path) -> Path:
    """Unpack a bundle archive, refusing absolute paths, `..`, links and more than one top folder."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{archive} is not a readable zip archive: {exc}") from None
    with zf:
        tops = set()
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if not path.parts:  # "", "." and "./" name nothing inside the bundle
                raise BundleError(f"{archive}: refusing entry without a name {info.filename!r}")
            if info.filename.startswith(("/", "\\")) or path.is_absolute():
                raise BundleError(f"{archive}: refusing absolute path {info.filename!r}")
            if ":" in info.filename:
                raise BundleError(f"{archive}: refusing Windows drive or stream path {info.filename!r}")
            if ".." in path.parts or "\\" in info.filename:
                raise BundleError(f"{archive}: refusing path that leaves the bundle {info.filename!r}")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BundleError(f"{archive}: refusing symbolic link {info.filename!r}")
            tops.add(path.parts[0])
        if len(tops) != 1:
            raise BundleError(f"{archive}: expected one top-level folder, found {len(tops)}")
        zf.extractall(dest)
    return dest / tops.pop()


@dataclass
class Opened:
    """A bundle root (with a manifest) or a model folder (without): what `verify`, `run` and `bench` open.

    The manifest's bytes are read once and parsed only when asked for, so a signature is checked on the
    bytes that are then believed, before anything in them is."""

    root: Path
    source: Path | None = None  # what the user named (an archive is unpacked elsewhere): for messages
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def is_bundle(self) -> bool:
        return (self.root / MANIFEST).is_file()

    @property
    def is_model_folder(self) -> bool:
        return (self.root / GENAI_CONFIG).is_file()

    def neither(self) -> str:
        return f"{self.source or self.root} is neither a phiedge bundle nor a model folder (no {GENAI_CONFIG})"

    @property
    def manifest_bytes(self) -> bytes:
        if "raw" not in self._cache:
            path = self.root / MANIFEST
            if not path.is_file():
                raise BundleError(f"{self.root}: no {MANIFEST} (not a phiedge bundle)")
            try:
                self._cache["raw"] = path.read_bytes()
            except OSError:
                raise BundleError(f"{path}: cannot be read") from None
        return self._cache["raw"]

    @property
    def manifest(self) -> Manifest:
        if "manifest" not in self._cache:
            self._cache["manifest"] = parse_manifest(self.manifest_bytes, self.root / MANIFEST)
        return self._cache["manifest"]

    @cached_property
    def folder(self) -> ModelFolder:
        """The model folder: where the manifest puts it in a bundle, the root itself otherwise."""
        if not self.is_bundle and not self.is_model_folder:
            raise BundleError(self.neither())
        return ModelFolder(self.root / self.manifest.model_dir if self.is_bundle else self.root)


@contextmanager
def opened(path: str | Path) -> Iterator[Opened]:
    """The bundle (archive, unpacked to a temporary folder, or folder) or model folder at path."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if path.is_dir():
        yield Opened(path, path)
        return
    with tempfile.TemporaryDirectory(prefix="phiedge-bundle-") as tmp:
        yield Opened(safe_extract(path, Path(tmp)), path)


# --- the bench record (`phiedge bench -o jsonl`, read back by --compare) ---------------------------------------

class BenchRecord(Lenient):
    """One test of `phiedge bench`, with llama-bench's field names where one exists."""

    phiedge_version: str | None = None
    test: str
    n_prompt: int | None = None
    n_gen: int | None = None
    n_depth: int | None = None
    adapter: str | None = None  # the LoRA adapter active, None for the base
    adapter_load_ms: float | None = None
    avg_ts: float
    stddev_ts: float | None = None
    samples_ts: list[float] = []
    samples_ns: list[int] = []
