"""The build record: what was built, from what, how it was checked, with which stack."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from phiedge import __version__

STACK = ("olive-ai", "onnx", "onnxruntime", "onnxruntime-genai", "transformers", "torch")


def stack_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The stack's versions; `extra`: packages a target's runtime adds (onnxruntime-qnn for the NPU)."""
    found = {"phiedge": __version__}
    for name in STACK + extra:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# Where and how long: true of one run, not of the model. Left out of the files in the output folder, so the
# same inputs give byte-identical folders (and bundles) wherever and whenever they are built.
VOLATILE = {"build_seconds", "built", "reference"}


def reproducible(data: dict) -> dict:
    out = {k: v for k, v in data.items() if k not in VOLATILE}
    if isinstance(out.get("source"), dict):
        out["source"] = {k: v for k, v in out["source"].items() if k != "path"}
    return out
