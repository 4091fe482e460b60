"""How many calibration tokens `--calibrate` needs: importance from N tokens against the largest N, and the time.

    python benchmarks/calibration.py --model DIR                      # a checkpoint (trained: the numbers mean something)
    python benchmarks/calibration.py --model DIR --tokens 1024,8192,32768 --markdown

For each N, calibrate.collect's importance (every matrix's input mean squares) over the first N tokens of the
stdlib training split, and per matrix the relative L2 distance to the importance from the largest N (the
reference); the rows give the median and the largest distance over the matrices, and the collection's time
(wall, this process, one decoder layer at a time as in a build). One JSON line per N, or a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from phiedge.quantize import calibrate


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--tokens", default="512,1024,2048,4096,8192,16384,32768",
                        help="comma-separated token counts; the largest is the reference")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    counts = sorted(int(t) for t in args.tokens.split(","))
    results = {n: calibrate.collect(args.model, tokens=n) for n in counts}
    reference = results[counts[-1]][0]
    rows = []
    for n in counts:
        importance, run = results[n]
        d = [distance(importance[k], reference[k]) for k in reference]
        rows.append({"tokens": run["tokens"], "seconds": run["seconds"], "median_distance": float(np.median(d)),
                     "max_distance": float(np.max(d)),
                     "worst": max(reference, key=lambda k: distance(importance[k], reference[k]))})
    if args.markdown:
        print(f"| tokens | seconds | median rel. L2 to {counts[-1]} tokens | largest | matrix |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['tokens']} | {r['seconds']} | {r['median_distance']:.3f} | {r['max_distance']:.3f} | {r['worst']} |")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
