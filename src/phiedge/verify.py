"""`phiedge verify`: a bundle is intact, this runtime can run it, and the model loads.

Catches before shipping what otherwise fails on the device: a missing genai_config.json, a truncated
or altered .onnx.data ("offset out of bounds" at load), a runtime older than the builder. With a trusted
key (`--trust`), also who packaged it: see signing.py.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from . import signing
from .errors import BuildError, PhiedgeError
from .model_safety import check_model_folder
from .package import FORMAT, MANIFEST, sha256


class BundleError(PhiedgeError):
    """The bundle is damaged, unsafe, or cannot run here; the message names the first problem."""


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


RUNTIME_PACKAGES = ("onnxruntime-genai", "onnxruntime-genai-directml", "onnxruntime-genai-cuda",
                    "onnxruntime-genai-winml")


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


def inside(rel) -> str:
    """A manifest path, refused unless it is relative and stays inside the bundle."""
    path = PurePosixPath(rel) if isinstance(rel, str) else None
    if path is None or not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or ":" in path.parts[0]:
        raise BundleError(f"manifest path {rel!r} leaves the bundle (or is not a path)")
    return rel


def manifest_bytes(root: Path) -> bytes:
    """The manifest file of an unpacked bundle, read once: the bytes a signature covers are the bytes parsed."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (not a phiedge bundle)")
    try:
        return manifest_path.read_bytes()
    except OSError:
        raise BundleError(f"{manifest_path}: cannot be read") from None


def read_manifest(root: Path) -> dict:
    """The manifest of an unpacked bundle, with its shape checked."""
    return parse_manifest(manifest_bytes(root), root / MANIFEST)


def parse_manifest(text: str | bytes, manifest_path) -> dict:
    """A manifest's text, parsed and shape-checked: whatever it holds, a BundleError or a usable dict."""
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{manifest_path}: not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not a {FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise BundleError(f"{manifest_path}: 'files' must map each path to its size and sha256")
    for rel in [*files, manifest.setdefault("model_dir", "model")]:
        inside(rel)
    runtime = manifest.get("min_runtime")
    if not isinstance(runtime, dict) or not isinstance(runtime.get("onnxruntime-genai"), str):
        raise BundleError(f"{manifest_path}: 'min_runtime' must name the onnxruntime-genai version")
    if not isinstance(manifest.get("name"), str) or not isinstance(manifest.get("checks") or {}, dict):
        raise BundleError(f"{manifest_path}: 'name' must be text and 'checks' an object")
    return manifest


def verify_dir(root: Path, load: bool = True, trust: signing.PublicKey | None = None) -> dict:
    """Check an unpacked bundle folder; raise BundleError (SignatureError with `trust`) on the first problem."""
    raw = manifest_bytes(root) if trust is None or (root / MANIFEST).is_file() else None
    signature = signing.check_bundle(root, raw, trust, MANIFEST)  # before anything in the manifest is believed
    manifest = parse_manifest(raw, root / MANIFEST) if raw is not None else read_manifest(root)
    files = manifest["files"]
    for rel, want in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{rel} is missing")
        if path.stat().st_size != want["size"]:
            raise BundleError(f"{rel} is {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        if sha256(path) != want["sha256"]:
            raise BundleError(f"{rel} does not match its SHA-256 in the manifest (altered)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, signing.SIGNATURE}
    extra = sorted(present - set(files))
    if extra:
        raise BundleError(f"{extra[0]} is not in the manifest")
    need, have = manifest["min_runtime"]["onnxruntime-genai"], runtime_version()
    if version_tuple(have) < version_tuple(need):
        raise BundleError(f"onnxruntime-genai {have} is older than {need}, which built this model")
    model_dir = root / manifest["model_dir"]
    if not (model_dir / "genai_config.json").is_file():
        raise BundleError(f"{model_dir.relative_to(root)} has no genai_config.json")
    check_model_folder(model_dir, manifest.get("execution_provider"))  # with or without load: nothing runs
    checks = manifest.get("checks") or {}
    not_here = checks.get("not_run_here") or None
    if load and not not_here:
        from .checks import smoke_generate

        try:
            smoke_generate(model_dir, n_tokens=1)
        except BuildError as exc:
            raise BundleError(f"onnxruntime-genai {have}: {exc}") from None
    return {"bundle": manifest["name"], "files": len(files), "runtime": have, "min_runtime": need,
            "loaded": bool(load and not not_here), "not_loaded_because": not_here if load else None,
            "graph_checked_for": (checks.get("graph") or {}).get("provider") if isinstance(checks.get("graph"), dict)
            else None, "signature": signature, "ok": True}


def model_folder(root: Path) -> Path:
    """Where a bundle keeps its model folder (it depends on the layout); a model folder is its own."""
    if (Path(root) / MANIFEST).is_file():
        return Path(root) / read_manifest(Path(root))["model_dir"]
    return Path(root)


@contextmanager
def opened(path: str | Path):
    """Yield the bundle root of an archive (unpacked to a temporary folder) or of a folder."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="phiedge-bundle-") as tmp:
        yield safe_extract(path, Path(tmp))


def verify(path: str | Path, load: bool = True, trust: str | Path | None = None) -> dict:
    """verify_dir on a bundle archive or folder; `trust` is a public key file or key line (signing.load_public)."""
    key = signing.load_public(trust) if trust else None
    with opened(path) as root:
        return verify_dir(root, load, key)
