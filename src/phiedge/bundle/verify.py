"""`phiedge verify`: a bundle is intact, this runtime can run it, and the model loads.

Catches before shipping what otherwise fails on the device: a missing genai_config.json, a truncated
or altered .onnx.data ("offset out of bounds" at load), a runtime older than the builder. With a trusted
key (`--trust`), also who packaged it: see signing.py.
"""

from __future__ import annotations

from pathlib import Path

from phiedge.artifacts import (
    GENAI_CONFIG,
    MANIFEST,
    SIGNATURE,
    Checks,
    Opened,
    opened,
    safe_extract,
    sha256,
)
from phiedge.bundle import signing
from phiedge.bundle.model_safety import check_model_folder
from phiedge.bundle.smoke import smoke_generate
from phiedge.errors import BuildError, BundleError
from phiedge.schema import PROVIDERS

__all__ = ["BundleError", "opened", "safe_extract", "verify", "verify_dir"]

# Each provider's build of onnxruntime-genai has its own name; WinML's runs the DirectML bundles too.
RUNTIME_PACKAGES = (*dict.fromkeys(p.runtime_package for p in PROVIDERS.values()), "onnxruntime-genai-winml")


def runtime_version() -> str:
    """Version of whichever onnxruntime-genai package is installed (the provider builds have their own names)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in RUNTIME_PACKAGES:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    raise BundleError("onnxruntime-genai is not installed (pip install onnxruntime-genai)")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:3])


def verify_dir(bundle: Opened | Path, load: bool = True, trust: signing.PublicKey | None = None) -> dict:
    """Check an unpacked bundle folder; raise BundleError (SignatureError with `trust`) on the first problem."""
    bundle = bundle if isinstance(bundle, Opened) else Opened(Path(bundle))
    root = bundle.root
    raw = bundle.manifest_bytes if trust is None or bundle.is_bundle else None
    signature = signing.check_bundle(root, raw, trust, MANIFEST)  # before anything in the manifest is believed
    manifest = bundle.manifest
    files = manifest.files
    for rel, want in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{rel} is missing")
        if path.stat().st_size != want.size:
            raise BundleError(f"{rel} is {path.stat().st_size} bytes, the manifest says {want.size} (truncated?)")
        if sha256(path) != want.sha256:
            raise BundleError(f"{rel} does not match its SHA-256 in the manifest (altered)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    extra = sorted(present - set(files))
    if extra:
        raise BundleError(f"{extra[0]} is not in the manifest")
    need, have = manifest.min_runtime.onnxruntime_genai, runtime_version()
    if version_tuple(have) < version_tuple(need):
        raise BundleError(f"onnxruntime-genai {have} is older than {need}, which built this model")
    model_dir = bundle.folder.path
    adapters = manifest.adapters or {}
    unlisted = sorted(a["file"] for a in adapters.values() if a.get("file") not in files)
    if unlisted:
        raise BundleError(f"{unlisted[0]}, an adapter of the manifest, is not among its files")
    if not (model_dir / GENAI_CONFIG).is_file():
        raise BundleError(f"{model_dir.relative_to(root)} has no {GENAI_CONFIG}")
    check_model_folder(model_dir, manifest.execution_provider)  # with or without load: nothing runs
    checks = manifest.checks or Checks()
    not_here = checks.not_run_here or None
    if load and not not_here:
        try:
            smoke_generate(model_dir, n_tokens=1, adapters=sorted(adapters))
        except BuildError as exc:
            raise BundleError(f"onnxruntime-genai {have}: {exc}") from None
    return {"bundle": manifest.name, "files": len(files), "runtime": have, "min_runtime": need,
            "loaded": bool(load and not not_here), "not_loaded_because": not_here if load else None,
            "adapters": sorted(adapters),
            "graph_checked_for": (checks.graph or {}).get("provider"), "signature": signature, "ok": True}


def verify(path: str | Path, load: bool = True, trust: str | Path | None = None) -> dict:
    """verify_dir on a bundle archive or folder; `trust` is a public key file or key line (signing.load_public)."""
    key = signing.load_public(trust) if trust else None
    with opened(path) as bundle:
        return verify_dir(bundle, load, key)
