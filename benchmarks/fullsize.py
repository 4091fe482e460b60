"""Memory and time of int4 builds as Phi-4-mini grows from 2 to 32 layers: phiedge's recipes and the raw builder.

    python benchmarks/fullsize.py                          # 2, 4, 8 and 32 layers (about 20 minutes)
    python benchmarks/fullsize.py --layers 2,4 --markdown
    python benchmarks/fullsize.py --raw-max-layers 8       # the raw builder only up to 8 layers (default)

Each checkpoint is `phiedge synth --like phi-4-mini --layers L` (real widths and vocabulary, bf16, random
weights). Each build runs under /usr/bin/time -v, which gives its peak resident memory (the largest process
of the build, Olive's child included) and wall time:
- phiedge cpu: `phiedge build --target cpu` (the builder exports fp32, then quantizes the whole graph);
- phiedge cpu-rtn: `--recipe cpu-rtn` (Olive's Rtn pass quantizes the PyTorch model, the builder reads the
  quantized checkpoint);
- raw builder: `python -m onnxruntime_genai.models.builder` with the cpu target's int4 settings.
The raw builder and the default recipe need about 15 GB at 4 layers and grow by about 2.4 GB a layer at
0.14.1, so they are run only up to --raw-max-layers. Prints one JSON line per build: layers, method,
peak RSS, wall seconds, checkpoint bytes and output folder bytes (or the error).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: peak RSS, wall seconds, exit status."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("\t")][-1:]
    return {"peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None, "wall_seconds": seconds,
            "exit": proc.returncode, **({"error": tail[0][-300:]} if proc.returncode and tail else {})}


def builds(checkpoint: Path, work: Path, layers: int, raw_max: int) -> list[tuple[str, list[str], Path]]:
    from phiedge.catalog import find_target

    int4 = find_target("cpu").int4
    out = {name: work / f"{name}-{layers}" for name in ("cpu", "cpu-rtn", "raw")}
    phiedge = [str(BIN / "phiedge"), "build", "--target", "cpu", "--model", str(checkpoint), "--no-validate", "-q"]
    planned = [("phiedge cpu-rtn", [*phiedge, "--recipe", "cpu-rtn", "-o", str(out["cpu-rtn"])], out["cpu-rtn"])]
    if layers <= raw_max:
        planned.insert(0, ("phiedge cpu", [*phiedge, "-o", str(out["cpu"])], out["cpu"]))
        extra = [f"int4_block_size={int4.block_size}", f"int4_accuracy_level={int4.accuracy_level}",
                 f"int4_is_symmetric={str(int4.symmetric).lower()}", "hf_token=false", "hf_remote=false",
                 "prune_lm_head=true"]
        planned.append(("raw builder", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                                        "-o", str(out["raw"]), "-p", "int4", "-e", "cpu", "-c",
                                        str(work / "builder-cache"), "--extra_options", *extra], out["raw"]))
    return planned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4,8,32", help="comma-separated layer counts")
    parser.add_argument("--raw-max-layers", type=int, default=8,
                        help="run the raw builder and the default recipe only up to this many layers")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and builds go (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        for layers in [int(x) for x in args.layers.split(",")]:
            checkpoint = work / f"phi-4-mini-{layers}"
            print(f"[fullsize] synth {layers} layers", file=sys.stderr, flush=True)
            subprocess.run([str(BIN / "phiedge"), "synth", "--like", "phi-4-mini", "--layers", str(layers), "-o",
                            str(checkpoint)], check=True, stdout=subprocess.DEVNULL)
            for method, cmd, out in builds(checkpoint, work, layers, args.raw_max_layers):
                print(f"[fullsize] {method}, {layers} layers", file=sys.stderr, flush=True)
                row = {"layers": layers, "method": method, **timed(cmd), "checkpoint_bytes": folder_bytes(checkpoint),
                       "output_bytes": folder_bytes(out) if out.exists() else None}
                rows.append(row)
                if not args.markdown:
                    print(json.dumps(row), flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    if args.markdown:
        print("| layers | method | peak RSS GB | x checkpoint | wall s | checkpoint GB | output GB |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            peak = r["peak_rss_bytes"] or 0
            status = "" if r["exit"] == 0 else f" (failed: {r.get('error', r['exit'])})"
            print(f"| {r['layers']} | {r['method']}{status} | {peak / 1e9:.1f} | {peak / r['checkpoint_bytes']:.1f} | "
                  f"{r['wall_seconds']:.0f} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                  f"{(r['output_bytes'] or 0) / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
