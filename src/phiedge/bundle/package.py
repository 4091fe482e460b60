"""`phiedge package`: a built model folder -> a release archive that runs and proves it is intact.

The archive holds, under `<name>/`: the model folder (ONNX model, external data, genai_config.json,
tokenizer) where the target's platform wants it, `generate.py` (needs only onnxruntime-genai, for a
desktop check), the platform's example (Kotlin, Swift, PowerShell), `requirements.txt`, `README.md` and
`manifest.json` (every other file with size and SHA-256, the model, target, recipe, versions, checks and
validation numbers, context cap) and, with `--sign KEY`, `manifest.json.minisig` (see signing.py).
Entries are sorted, stored uncompressed with fixed timestamps and modes: packaging the same build twice
gives byte-identical archives, signed or not.

Layouts (the target's `bundle.layout`):
- flat: `model/`
- android: `app/src/main/assets/phi/` (app assets) and `app/src/main/java/ai/phiedge/PhiedgeChat.kt`
- ios: `Resources/phi/` (an Xcode folder reference) and `Sources/PhiedgeChat.swift`
- windows: `model/` and `run.ps1`
- windows-npu: `model/` and `run.ps1` (Windows on Arm, the Snapdragon NPU through onnxruntime-qnn)
- android-npu: as android, for the Snapdragon NPU of a phone (ONNX Runtime's QNN AAR and Qualcomm's QNN runtime)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

from phiedge import __version__
from phiedge.artifacts import (
    CHUNK,
    FORMAT,
    GENAI_CONFIG,
    MANIFEST,
    RECORD,
    SIGNATURE,
    BuildRecord,
    ModelFolder,
    sha256,
)
from phiedge.bundle import signing
from phiedge.errors import PackageError
from phiedge.workspace import check_output, staged_file

EPOCH = (1980, 1, 1, 0, 0, 0)
ADAPTER_NUMBERS = ("passed", "kl_mean", "kl_p99", "top1", "ppl_ratio")  # what a manifest says of an adapter's check
__all__ = ["FORMAT", "MANIFEST", "PackageError", "archive_path", "package", "sha256"]


TEMPLATES = Path(__file__).parent / "templates"
GENERATE = Path(__file__).parent / "generate.py"  # copied into every bundle; needs only onnxruntime-genai
LAYOUTS = {  # layout -> (model folder in the bundle, {bundle path: template file})
    "flat": ("model", {}),
    "android": ("app/src/main/assets/phi", {"app/src/main/java/ai/phiedge/PhiedgeChat.kt": "android/PhiedgeChat.kt"}),
    "ios": ("Resources/phi", {"Sources/PhiedgeChat.swift": "ios/PhiedgeChat.swift"}),
    "windows": ("model", {"run.ps1": "windows/run.ps1"}),
    "windows-npu": ("model", {"run.ps1": "windows/run.ps1"}),
    "android-npu": ("app/src/main/assets/phi",
                    {"app/src/main/java/ai/phiedge/PhiedgeChat.kt": "android/PhiedgeChat.kt"}),
}
HOW_TO_RUN = {
    "flat": "    pip install -r requirements.txt\n    python generate.py model --prompt \"Hello\"",
    "android": "Copy `app/` into your Android project (the model goes into the app's assets, the Kotlin class into\n"
               "your sources) and follow the comment at the top of `PhiedgeChat.kt` (Gradle dependency, no\n"
               "compression of .onnx/.data assets). On a desktop first: `python generate.py app/src/main/assets/phi`.",
    "ios": "Add `Resources/phi` to your Xcode target as a folder reference and `Sources/PhiedgeChat.swift` to\n"
           "your sources; the comment at its top names the package. ONNX Runtime GenAI's iOS support is still\n"
           "maturing upstream. On a desktop first: `python generate.py Resources/phi`.",
    "windows": "On Windows with a DirectX 12 GPU, in PowerShell:\n\n    .\\run.ps1 -Prompt \"Hello\"\n\n"
               "Upstream caveat (November 2026): the onnxruntime-genai-directml 0.14 wheels require\n"
               "onnxruntime-directml 1.26 or newer, which PyPI did not carry; DirectML is deprecated upstream in\n"
               "favour of Windows ML. If pip cannot resolve requirements.txt, install both from the ONNX Runtime\n"
               "GenAI release page.",
    "windows-npu": "On a Windows on Arm PC with a Snapdragon NPU (Snapdragon X), in PowerShell:\n\n"
                   "    .\\run.ps1 -Prompt \"Hello\"\n\n"
                   "It installs onnxruntime-genai and onnxruntime-qnn (the QNN execution provider and its HTP\n"
                   "libraries) into .venv, and generate.py registers the provider from that package. The decoder runs\n"
                   "on the NPU from QNN context binaries compiled for one chip (`runtime.npu` in the model folder's\n"
                   "phiedge_build.json: htp_arch, soc_model); the embedding lookup and the LM head run on the CPU.\n"
                   "Shapes are static: a prompt may be one window long at most (`sliding_window` in\n"
                   "genai_config.json), and the KV cache has the context cap's length.",
    "android-npu": "Copy `app/` into your Android project and follow the comment at the top of `PhiedgeChat.kt`:\n"
                   "for the NPU, ONNX Runtime's QNN build (onnxruntime-android-qnn) and Qualcomm's QNN runtime\n"
                   "libraries (com.qualcomm.qti:qnn-runtime, whose version should match the ep_sdk_version in the\n"
                   "*_ctx.onnx files), which Gradle puts in the APK's native libraries. The decoder runs on the NPU\n"
                   "from QNN context binaries compiled for one chip (`runtime.npu` in phiedge_build.json: htp_arch,\n"
                   "soc_model); the embedding lookup and the LM head run on the CPU. A prompt may be one window long\n"
                   "at most (`sliding_window` in genai_config.json). On a desktop first: `python generate.py\n"
                   "app/src/main/assets/phi` with onnxruntime-qnn installed (its HTP simulator on x86-64 Linux).",
}


def bundle_name(record: BuildRecord) -> str:
    """<checkpoint folder>-<variant>[-synth]-<precision>-<target>-phiedge<version>, safe as a file name."""
    source = record.source
    variant = (source.variant or "phi") + ("-synth" if source.shrunk else "")
    folder = "".join(c if c.isalnum() or c in "._-" else "-" for c in source.name or "").strip("-.")
    model = variant if not folder or folder.lower() in (variant.lower(), source.variant) else f"{folder}-{variant}"
    return f"{model}-{record.precision}-{record.target}-phiedge{record.phiedge_version}"


def model_summary(folder: ModelFolder, record: BuildRecord) -> dict:
    cfg = json.loads((folder.path / "config.json").read_text()) if (folder.path / "config.json").is_file() else {}
    decoder = folder.decoder
    source = record.source
    return {"variant": source.variant, "hub": source.hub.model_dump() if source.hub else None,
            "architecture": source.architecture,
            "shrunk": source.shrunk, "params": source.params,
            "shape": {"hidden_size": decoder["hidden_size"], "layers": decoder["num_hidden_layers"],
                      "heads": decoder["num_attention_heads"], "kv_heads": decoder["num_key_value_heads"],
                      "head_dim": decoder["head_size"], "vocab_size": cfg.get("vocab_size"),
                      "context_length": cfg.get("max_position_embeddings")},
            "precision": record.precision, "int4": record.int4}


def readme(manifest: dict, signed_by: str | None = None) -> str:
    v = manifest.get("validation") or {}
    checks = manifest.get("checks") or {}
    verdict = {True: "thresholds met", False: "a threshold crossed"}.get(v.get("passed"),
                                                                          f"not enforced: {v.get('note')}")
    numbers = (f"KL {v['kl_mean']:.3g} (p99 {v['kl_p99']:.3g}), top-1 {v['top1']:.4f}, perplexity ratio "
               f"{v['ppl_ratio']:.4f} against the original checkpoint ({verdict})" if v else
               "not validated numerically" + (f" ({checks['not_run_here']})" if checks.get("not_run_here") else ""))
    return f"""# {manifest['name']}

{manifest['model']['variant'] or 'Phi'} model for ONNX Runtime GenAI, built by phiedge {manifest['phiedge_version']}
for the `{manifest['target']}` target ({manifest['execution_provider']}, {manifest['model']['precision']}).
The model folder is `{manifest['model_dir']}`.

{HOW_TO_RUN[manifest['layout']]}

Check it is intact first: `phiedge verify` on this folder or archive (sizes, SHA-256, runtime version, load).
{signed_line(signed_by)}

To serve it with the OpenAI API (chat completions, streaming, tools, JSON output), with phiedge installed run
`phiedge serve` on this folder or archive (`--port 8000`, `--api-key KEY`), and point any OpenAI client at
`http://127.0.0.1:8000/v1`.

- context cap (KV cache): {manifest['context_cap']} tokens
- validation: {numbers}
- minimum onnxruntime-genai: {manifest['min_runtime']['onnxruntime-genai']}
{adapter_lines(manifest)}"""


def adapter_lines(manifest: dict) -> str:
    adapters = manifest.get("adapters") or {}
    if not adapters:
        return ""
    lines = ["", "LoRA adapters (one at a time over the same base; `python generate.py ... --adapter NAME`, "
             "`phiedge run ... --adapter NAME`, or the model `base:NAME` from `phiedge serve`):", ""]
    for name, a in sorted(adapters.items()):
        v = a.get("validation") or {}
        numbers = f", KL {v['kl_mean']:.3g} against the checkpoint with PEFT applying it" if v.get("kl_mean") else ""
        lines.append(f"- `{name}`: rank {a['rank']} on {', '.join(a['modules'])}, "
                     f"{a['size_bytes'] / 1e6:.2f} MB{numbers}")
    return "\n".join(lines) + "\n"


def signed_line(key_id: str | None) -> str:
    if key_id is None:
        return "This bundle is not signed: `verify` shows only that its files match its own manifest."
    return (f"Signed with key {key_id}: `phiedge verify --trust KEY.pub` (or `minisign -Vm manifest.json -p KEY.pub`\n"
            "in this folder) with the publisher's public key shows the files are the ones they packaged.")


def manifest_for(folder: ModelFolder, name: str, files: dict[str, dict], layout: str = "flat") -> dict:
    record, report = folder.record, folder.report
    builder = record.versions.get("onnxruntime-genai", "0")
    return {
        "format": FORMAT, "name": name, "phiedge_version": __version__,
        "target": record.target, "recipe": record.recipe, "execution_provider": record.execution_provider,
        "layout": layout, "model_dir": LAYOUTS[layout][0],
        "model": model_summary(folder, record),
        "context_cap": record.runtime.max_length, "threads": record.runtime.intra_op_num_threads,
        "versions": record.versions,
        # A runtime older than the builder may reject its genai_config.json.
        "min_runtime": {"onnxruntime-genai": builder},
        "validation": None if report is None else {
            **{k: v for k, v in report.metrics.model_dump().items() if k != "prompts"},
            "passed": report.passed, "enforced": report.enforced, "note": report.note,
            "dequantized": report.dequantized},
        "checks": None if record.checks is None else record.checks.model_dump(exclude_unset=True),
        "adapters": {a.name: {"file": f"{LAYOUTS[layout][0]}/{a.file}", "rank": a.rank, "modules": a.modules,
                              "size_bytes": a.size_bytes,
                              "validation": a.validation and {k: a.validation.get(k) for k in ADAPTER_NUMBERS}}
                     for a in record.adapters} or None,
        "files": files,
    }


def entries(model_dir: Path, layout: str = "flat") -> dict[str, Path]:
    """archive path (relative to the bundle root) -> source file."""
    folder, extras = LAYOUTS[layout]
    out = {f"{folder}/{p.name}": p for p in sorted(model_dir.iterdir()) if p.is_file()}
    out["generate.py"] = GENERATE
    out.update({arc: TEMPLATES / template for arc, template in extras.items()})
    return out


def requirements(record: BuildRecord) -> bytes:
    """The runtime's pip packages, at least the version that built the model."""
    runtime = record.versions.get("onnxruntime-genai", "0")
    packages = (record.bundle or {}).get("requirements") or ["onnxruntime-genai"]
    return "".join(f"{p}>={own_version(record, p) or runtime}\n" for p in packages).encode()


def own_version(record: BuildRecord, package: str) -> str | None:
    """The version of a runtime package the build recorded, when it was installed there (onnxruntime-qnn); others
    (onnxruntime-genai-directml, not installable here) get onnxruntime-genai's."""
    found = record.versions.get(package, "")
    return found if found[:1].isdigit() else None


def write_entry(zf: zipfile.ZipFile, arcname: str, data: bytes | Path) -> None:
    info = zipfile.ZipInfo(arcname, date_time=EPOCH)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED
    with zf.open(info, "w", force_zip64=True) as dst:
        if isinstance(data, bytes):
            dst.write(data)
        else:
            with open(data, "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)


def archive_path(out: str | Path, name: str) -> Path:
    """Where `phiedge package -o OUT` writes: OUT itself, or OUT/NAME.zip when OUT is a folder (one that
    exists, or a path ending in a slash, which is made)."""
    folder = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    return Path(out) / f"{name}.zip" if folder else Path(out)


def package(model_dir: str | Path, out: str | Path, force: bool = False, sign: signing.SecretKey | None = None) -> dict:
    """Write the archive at `out` (atomically; into it as NAME.zip if out is a folder); return its manifest.
    With `sign`, the archive also holds its signature of the manifest's bytes."""
    folder = ModelFolder(model_dir)
    model_dir = folder.path
    if not (model_dir / RECORD).is_file() or not (model_dir / GENAI_CONFIG).is_file():
        raise PackageError(f"{model_dir} is not a folder written by `phiedge build` (no {RECORD})")
    record = folder.record
    folder.report  # a malformed report is one line before anything is written
    name = bundle_name(record)
    layout = (record.bundle or {}).get("layout", "flat")
    if layout not in LAYOUTS:
        raise PackageError(f"{model_dir / RECORD}: bundle.layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    out = archive_path(out, name)
    check_output(out, force)  # makes the folder; before the hashing, so a bad output path fails at once
    sources = entries(model_dir, layout)
    extra = {"requirements.txt": requirements(record)}
    files = {arc: {"size": p.stat().st_size, "sha256": sha256(p)} for arc, p in sources.items()}
    files.update({arc: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for arc, b in extra.items()})
    manifest = manifest_for(folder, name, {}, layout)
    extra["README.md"] = readme(manifest, sign and sign.id).encode()
    files["README.md"] = {"size": len(extra["README.md"]), "sha256": hashlib.sha256(extra["README.md"]).hexdigest()}
    manifest["files"] = dict(sorted(files.items()))
    extra[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    if sign is not None:
        extra[SIGNATURE] = signing.sign(extra[MANIFEST], sign, f"phiedge bundle {name}")
    with staged_file(out, force) as tmp:  # one writer; a full disk is one line and leaves no partial archive
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            payload = {**sources, **extra}
            for arc in sorted(payload):
                write_entry(zf, f"{name}/{arc}", payload[arc])
    return manifest
