"""The check against the dequantized reference: healthy builds and damaged ones, side by side.

    python benchmarks/dequant_check.py --markdown                  # synth checkpoints only (~15 min on 2 cores)
    python benchmarks/dequant_check.py --trained DIR --markdown    # and a model made by `phiedge train`
    python benchmarks/dequant_check.py --only phi-4-mini           # checkpoints whose name has this text

Each checkpoint is built with method stream (the cpu target's settings unless the row says otherwise) and
compared by validation's own code (the built logits as validation reads them) with the checkpoint carrying
the healthy build's dequantized weights: the healthy build, then, for the checkpoints marked so, each fault
of tests/faults.py injected into a copy of it. "digests" is how many quantized matrices of the copy no
longer match the build's record (what validation fails on first); the logits columns show what the
comparison alone would see. A threshold belongs between the largest healthy value and the smallest
damaged one whose digests hold.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import faults  # noqa: E402  (tests/faults.py: the damage the tests inject)
from conftest import SHAPES  # noqa: E402  (the test suite's synth shapes)

from phiedge import catalog
from phiedge.artifacts import ModelFolder
from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.bundle.generate import load
from phiedge.checkpoints.corpus import eval_ids
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.checks import dequantized
from phiedge.checks.validate import built_logits, logits_every_position
from phiedge.demo import DEMO_SHRINK
from phiedge.schema import DequantizedSettings

# (name, variant, shrink, int4 overrides of the cpu target, inject the faults)
CHECKPOINTS = [
    ("synth phi-4-mini (tests)", "phi-4-mini", SHAPES["phi-4-mini"], {}, True),
    ("synth phi-4-mini (tests), accuracy level 1", "phi-4-mini", SHAPES["phi-4-mini"], {"accuracy_level": 1}, False),
    ("synth phi-4-mini (tests), b32 asymmetric, int4 table, 8-bit head", "phi-4-mini", SHAPES["phi-4-mini"],
     {"block_size": 32, "symmetric": False, "embeddings": "int4", "lm_head_bits": 8}, False),
    ("synth phi-3-mini-4k (tests)", "phi-3-mini-4k", SHAPES["phi-3-mini-4k"], {}, True),
    ("synth phi-4-mini (demo)", "phi-4-mini", DEMO_SHRINK, {}, False),
    ("synth phi-4-mini, 32 layers", "phi-4-mini", Shrink(layers=32, heads=3, kv_heads=1, intermediate=512,
                                                            vocab=2048), {}, True),
    ("synth phi-4-mini, real widths, 2 layers", "phi-4-mini", Shrink(layers=2, vocab=8192), {}, True),
]


def measure(folder: Path, healthy: Path, reference: str, settings: DequantizedSettings, window: int) -> dict:
    model, _ = load(str(folder))
    built = ModelFolder(folder)
    every = logits_every_position(built)
    started = time.perf_counter()
    recorded = dequantized.digests_of(built)
    wrong = dequantized.mismatched(dequantized.GraphWeights(built), recorded)
    truth = dequantized.load(reference, dequantized.GraphWeights(ModelFolder(healthy)), recorded)
    values = dequantized.metrics(truth, lambda ids: built_logits(model, ids, every),
                                 eval_ids(reference, settings.eval_tokens), window)
    return {"digests": len(wrong), **values, "seconds": round(time.perf_counter() - started, 1)}


def rows_for(name: str, checkpoint: str, int4: dict, with_faults: bool, work: Path) -> list[dict]:
    out = work / "".join(c if c.isalnum() else "_" for c in name)
    record = build(checkpoint, "cpu", out, BuildOptions(precision="int4", int4=int4, validate=False))
    settings = catalog.find_target("cpu").validation
    # no limits: measure, do not judge
    dq = settings.dequantized
    rows = [{"checkpoint": name, "build": "healthy", "int4": record["int4"],
             **measure(out, out, checkpoint, dq, settings.window)}]
    if with_faults:
        for fault, inject in faults.FAULTS.items():
            damaged = work / "damaged"
            shutil.rmtree(damaged, ignore_errors=True)
            shutil.copytree(out, damaged)
            what = inject(damaged)
            rows.append({"checkpoint": name, "build": fault, "changed": what,
                         **measure(damaged, out, checkpoint, dq, settings.window)})
    shutil.rmtree(out)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| checkpoint | build | digests | logits rel. RMS | KL mean | KL max | top-1 | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['checkpoint']} | {r['build']} | {r['digests']} | {r['logits_rel_rms']:.3g} | "
              f"{r['kl_mean']:.2e} | "
              f"{r['kl_max']:.2e} | {r['top1']:.3f} | {r['seconds']} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", help="also a checkpoint made by `phiedge train` (faults injected too)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    parser.add_argument("--only", help="only the checkpoints whose name contains this text")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        todo = [(name, lambda i=i, v=variant, s=shrink: synth(v, work / f"ckpt{i}", s, seed=1)["path"], int4, inject)
                for i, (name, variant, shrink, int4, inject) in enumerate(CHECKPOINTS)]
        if args.trained:
            todo.append(("trained phi-4-mini (phiedge train)", lambda: args.trained, {}, True))
        for name, make, int4, inject in todo:
            if args.only and args.only not in name:
                continue
            for row in rows_for(name, make(), int4, inject, work):
                rows.append(row)
                if not args.markdown:
                    print(json.dumps(row), flush=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
