"""`phiedge build --all-targets` (or `--target a,b`): build, validate and package every target in one run.

DIST gets one bundle archive per target and a release index, `release.json` and `RELEASE.md`: per target
the bundle's file name, size, SHA-256, validation numbers (or why there are none) and, where the graph
runs here on its own provider (not a simulator), a short benchmark. Targets whose recipe and settings agree
share one Olive export. Bundles are byte-identical across runs on the same inputs; the benchmark numbers in the
index are not.
`phiedge index DIST` writes the same index for bundles made elsewhere (one CI job per target).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from phiedge import __version__, catalog
from phiedge.artifacts import MANIFEST, Manifest, ModelFolder, parse_manifest, sha256
from phiedge.bench.measure import BenchTest, bench
from phiedge.build.exports import Exports
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.bundle.package import bundle_name, package
from phiedge.errors import PhiedgeError
from phiedge.progress import Progress
from phiedge.workspace import staged_dir

INDEX_JSON, INDEX_MD = "release.json", "RELEASE.md"
BENCH = {"n_prompt": 128, "n_gen": 32, "reps": 3}


def read_manifest(archive: Path) -> Manifest:
    """The manifest inside a bundle archive, without unpacking the model; shape-checked as `verify` does."""
    try:
        with zipfile.ZipFile(archive) as zf:
            name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/" + MANIFEST))
            text = zf.read(name)
    except (zipfile.BadZipFile, OSError, StopIteration) as exc:
        raise PhiedgeError(f"{archive} is not a phiedge bundle archive ({exc or 'no manifest'})") from None
    return parse_manifest(text, f"{archive}:{name}")


def entry(archive: Path) -> dict:
    manifest = read_manifest(archive)
    v, checks = manifest.validation, (manifest.checks.model_dump() if manifest.checks else {})
    return {"target": manifest.target, "bundle": manifest.name, "file": archive.name,
            "size_bytes": archive.stat().st_size, "sha256": sha256(archive),
            "execution_provider": manifest.execution_provider, "precision": (manifest.model or {}).get("precision"),
            "context_cap": manifest.context_cap,
            "validation": None if v is None else {k: v.get(k) for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio",
                                                                         "greedy", "enforced", "passed")},
            "not_validated_because": checks.get("not_run_here"),
            "memory_fits": (checks.get("memory") or {}).get("fits")}


def short_bench(model_dir: Path) -> dict:
    records = bench(model_dir, [BenchTest(BENCH["n_prompt"], 0), BenchTest(0, BENCH["n_gen"])], reps=BENCH["reps"])
    return {r["test"]: round(r["avg_ts"], 2) for r in records}


def markdown(index: dict) -> str:
    lines = [f"# Release: {index['model']}", "", f"phiedge {index['phiedge_version']}", "",
             "| target | bundle | MB | SHA-256 | KL mean | top-1 | ppl ratio | "
             f"pp{BENCH['n_prompt']} t/s | tg{BENCH['n_gen']} t/s |", "|" + "---|" * 9]
    for e in index["bundles"]:
        v, b = e["validation"], e.get("bench") or {}
        quality = (f"{v['kl_mean']:.3g} | {v['top1']:.4f} | {v['ppl_ratio']:.4f}"
                   + ("" if v.get("enforced") else " (not enforced)") if v else "not run here | | ")
        speed = " | ".join(str(b.get(t, "")) for t in (f"pp{BENCH['n_prompt']}", f"tg{BENCH['n_gen']}"))
        lines.append(f"| {e['target']} | `{e['file']}` | {e['size_bytes'] / 1e6:.1f} | `{e['sha256'][:16]}…` | "
                     f"{quality} | {speed} |")
    notes = [f"- {e['target']}: {e['not_validated_because']}" for e in index["bundles"] if e["not_validated_because"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_index(dist: Path, entries: list[dict], model: str) -> dict:
    index = {"model": model, "phiedge_version": __version__, "bundles": sorted(entries, key=lambda e: e["target"])}
    (dist / INDEX_JSON).write_text(json.dumps(index, indent=2) + "\n")
    (dist / INDEX_MD).write_text(markdown(index))
    return index


def index(dist: str | Path) -> dict:
    """The release index of the bundle archives already in dist."""
    dist = Path(dist)
    archives = sorted(dist.glob("*.zip"))
    if not archives:
        raise PhiedgeError(f"no bundle archives (*.zip) in {dist}")
    entries = [entry(a) for a in archives]
    return write_index(dist, entries, (read_manifest(archives[0]).model or {}).get("variant") or "phi")


def release(model_dir: str | Path, targets: list[str] | None, dist: str | Path, options: BuildOptions = BuildOptions(),
            force: bool = False, progress: Progress | None = None, run_bench: bool = True) -> dict:
    progress = progress or Progress(quiet=True)
    names = targets or sorted(catalog.targets())
    plans = [plan(model_dir, name, options) for name in names]  # every target's options checked before building
    with staged_dir(Path(dist), force=force, progress=progress) as tmp:
        exports = Exports(tmp / ".exports")
        entries = []
        for name in names:
            progress.step(f"target {name}")
            built = tmp / ".builds" / name
            build(model_dir, name, built, options, progress=progress, exports=exports)
            record = ModelFolder(built).record
            archive = tmp / f"{bundle_name(record)}.zip"
            package(built, archive)
            e = entry(archive)
            target = catalog.find_target(name)
            if run_bench and target.runs_here and not (target.checks and target.checks.simulated):
                progress.step(f"bench {name}")
                e["bench"] = short_bench(built)
            entries.append(e)
        shutil.rmtree(tmp / ".builds")
        shutil.rmtree(tmp / ".exports", ignore_errors=True)
        result = write_index(tmp, entries, plans[0].checkpoint.name)
    return result
