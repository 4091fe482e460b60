"""Memory, time and size of int4 builds as a Phi model grows to its full size: phiedge and the raw builder.

    python benchmarks/fullsize.py                                   # Phi-4-mini at 2, 4, 8 and 32 layers
    python benchmarks/fullsize.py --like phi-4 --layers 2,4,8,16,40 # Phi-4 (14 B): does it fit 32 GB?
    python benchmarks/fullsize.py --layers 32 --validate            # the full build, validated as usual
    python benchmarks/fullsize.py --layers 32 --target android      # another target's settings
    python benchmarks/fullsize.py --layers 2,4 --markdown
    python benchmarks/fullsize.py --layers 32 --builder-max-layers 0 --quantizer rtn --quantizer mse  # their time

Each checkpoint is `phiedge synth --like VARIANT --layers L` (real widths and vocabulary, bf16, random
weights: every matrix has its real size, so memory and time are the real ones). Builds, each in turn:
- phiedge cpu: `phiedge build --target cpu` (int4 method stream: phiedge quantizes the checkpoint matrix by
  matrix, Olive's ModelBuilder pass reads the quantized checkpoint);
- phiedge cpu, method builder: `--int4-method builder` (the builder exports fp32, then quantizes the graph);
- raw builder: `python -m onnxruntime_genai.models.builder` with the cpu target's int4 settings.
The last two grow about 0.85 GB a layer at Phi-4-mini's widths, so they run only up to --builder-max-layers.
Peak memory is sampled every 0.1 s as the sum of the resident memory of the whole process tree (phiedge, the
Olive child, the validation), and also read from /usr/bin/time -v (its largest single process). Prints one
JSON line per build: layers, method, peaks, wall seconds, checkpoint bytes, output folder bytes and, for
phiedge, its weight accounting (bytes over the ideal int4 size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from phiedge.artifacts import RECORD, BuildRecord, read

BIN = Path(sys.executable).parent


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v while sampling the process tree: peak RSS (tree and largest process), wall."""
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.communicate()[1]
    sampler.join()
    largest = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    tail = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("\t")][-1:]
    return {"peak_tree_rss_bytes": peak[0], "peak_process_rss_bytes": int(largest.group(1)) * 1024 if largest else None,
            "wall_seconds": seconds, "exit": proc.returncode,
            **({"error": tail[0][-300:]} if proc.returncode and tail else {})}


def builds(checkpoint: Path, work: Path, layers: int, builder_max: int, validate: bool, target: str,
           quantizers: list[str] | None = None) -> list[tuple]:
    from phiedge.catalog import find_target

    int4 = find_target(target).int4
    out = {name: work / f"{name}-{layers}" for name in ("stream", "builder", "raw")}
    phiedge = [str(BIN / "phiedge"), "build", "--target", target, "--model", str(checkpoint), "-q",
               *([] if validate else ["--no-validate"])]
    planned = [(f"phiedge {target}" + (f", quantizer {q}" if q else "") + (", validated" if validate else ""),
                [*phiedge, *(["--quantizer", q] if q else []), "-o", str(out["stream"])], out["stream"])
               for q in quantizers or [None]]
    if layers <= builder_max:
        planned.append((f"phiedge {target}, method builder",
                        [*phiedge, "--int4-method", "builder", "-o", str(out["builder"])], out["builder"]))
        extra = [f"int4_block_size={int4.block_size}", f"int4_accuracy_level={int4.accuracy_level}",
                 f"int4_is_symmetric={str(int4.symmetric).lower()}", "hf_token=false", "hf_remote=false",
                 "prune_lm_head=true"]
        planned.append(("raw builder", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                                        "-o", str(out["raw"]), "-p", "int4", "-e", "cpu", "-c",
                                        str(work / "builder-cache"), "--extra_options", *extra], out["raw"]))
    return planned


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | method | peak RSS GB (tree) | x bf16 checkpoint | largest process GB | wall s | "
             "checkpoint GB | output GB | over ideal int4 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r["peak_tree_rss_bytes"] or 0
        status = "" if r["exit"] == 0 else f" (failed: {r.get('error', r['exit'])})"
        over = f"{r['over_ideal']:.3f}" if r.get("over_ideal") else ""
        lines.append(f"| {r['like']} | {r['layers']} | {r['method']}{status} | {peak / 1e9:.1f} | "
                     f"{peak / r['checkpoint_bytes']:.2f} | {(r['peak_process_rss_bytes'] or 0) / 1e9:.1f} | "
                     f"{r['wall_seconds']:.0f} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                     f"{(r['output_bytes'] or 0) / 1e9:.2f} | {over} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="phi-4-mini", help="variant whose real widths and vocabulary to use")
    parser.add_argument("--layers", default="2,4,8,32", help="comma-separated layer counts")
    parser.add_argument("--builder-max-layers", type=int, default=8,
                        help="run the raw builder and phiedge's method builder only up to this many layers")
    parser.add_argument("--target", default="cpu", help="phiedge target to build for (the raw builder gets its settings)")
    parser.add_argument("--validate", action="store_true", help="validate phiedge's stream builds (slow at full size)")
    parser.add_argument("--quantizer", action="append", choices=["rtn", "mse"],
                        help="build phiedge's stream method with this quantizer (repeatable; default: the target's)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and builds go (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        for layers in [int(x) for x in args.layers.split(",")]:
            checkpoint = work / f"{args.like}-{layers}"
            print(f"[fullsize] synth {args.like}, {layers} layers", file=sys.stderr, flush=True)
            subprocess.run([str(BIN / "phiedge"), "synth", "--like", args.like, "--layers", str(layers), "-o",
                            str(checkpoint)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for method, cmd, out in builds(checkpoint, work, layers, args.builder_max_layers, args.validate,
                                           args.target, args.quantizer):
                print(f"[fullsize] {method}, {layers} layers", file=sys.stderr, flush=True)
                row = {"like": args.like, "layers": layers, "method": method, **timed(cmd),
                       "checkpoint_bytes": folder_bytes(checkpoint),
                       "output_bytes": folder_bytes(out) if out.exists() else None}
                if (out / RECORD).is_file():
                    weights = read(BuildRecord, out / RECORD).weights
                    row.update(ideal_bytes=weights["ideal_bytes"], over_ideal=weights["over_ideal"])
                rows.append(row)
                if not args.markdown:
                    print(json.dumps(row), flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
