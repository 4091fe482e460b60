"""Time of each quantizer on Phi-4-mini's real matrix shapes, and its projection to the whole model.

    python benchmarks/quantize_speed.py                  # block 128 (cpu) and 32 (android, ios), symmetric
    python benchmarks/quantize_speed.py --block 128 --asymmetric --markdown

Each matrix is random Student-t (df 5) weights at Phi-4-mini's shape (hidden 3072, MLP 8192, 24 query and 8 KV
heads of 128, vocabulary 200064), quantized by `phiedge.quantizer.quantize` as method stream calls it (rows
read 4096 at a time). The two vocabulary-sized matrices (the LM head at 4 bits and the int8 table) are timed
on their first 16384 rows and scaled. Whole model = 32 x (qkv + o + gate_up + down) + LM head + table, as
`phiedge build --target cpu` quantizes it. Wall seconds (the search runs on every core) and process CPU
seconds, best of --repeat; the machine's other load shows in the difference.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from phiedge.quantize.quantizer import METHODS, quantize

HIDDEN, MLP, HEAD, KV_HEADS, VOCAB, LAYERS = 3072, 8192, 128, 8, 200064, 32
SAMPLE_ROWS = 16384
# (name, rows, columns, bits, per model)
MATRICES = [
    ("qkv_proj", HIDDEN + 2 * KV_HEADS * HEAD, HIDDEN, 4, LAYERS),
    ("o_proj", HIDDEN, HIDDEN, 4, LAYERS),
    ("gate_up_proj", 2 * MLP, HIDDEN, 4, LAYERS),
    ("down_proj", HIDDEN, MLP, 4, LAYERS),
    ("lm_head", VOCAB, HIDDEN, 4, 1),
    ("embed_tokens (int8)", VOCAB, HIDDEN, 8, 1),
]


def timed(weight: np.ndarray, bits: int, block: int, symmetric: bool, method: str, repeat: int) -> tuple[float, float]:
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        quantize(weight, bits, block, symmetric, method)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, action="append", help="block size (repeatable; default 128 and 32)")
    parser.add_argument("--asymmetric", action="store_true", help="with zero points")
    parser.add_argument("--repeat", type=int, default=2, help="timings per matrix; the best counts")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for block in args.block or [128, 32]:
        totals = {m: [0.0, 0.0] for m in METHODS}
        for name, n, k, bits, count in MATRICES:
            sampled = min(n, SAMPLE_ROWS)
            weight = (rng.standard_t(5, (sampled, k)) * 0.02).astype(np.float32)
            row = {"block": block, "symmetric": not args.asymmetric, "matrix": f"{name} {n}x{k}", "per_model": count}
            for method in METHODS:
                wall, cpu = timed(weight, bits, block, not args.asymmetric, method, args.repeat)
                scale = n / sampled
                row[f"{method}_s"], row[f"{method}_cpu_s"] = round(wall * scale, 3), round(cpu * scale, 3)
                totals[method][0] += wall * scale * count
                totals[method][1] += cpu * scale * count
            rows.append(row)
            if not args.markdown:
                print(json.dumps(row), flush=True)
        total = {"block": block, "symmetric": not args.asymmetric, "matrix": "whole model (projected)", "per_model": 1,
                 **{f"{m}_{k}": round(v, 1) for m, (w, c) in totals.items() for k, v in (("s", w), ("cpu_s", c))}}
        rows.append(total)
        if not args.markdown:
            print(json.dumps(total), flush=True)
    if args.markdown:
        print("| block | matrix | per model | rtn s | rtn CPU s | mse s | mse CPU s | mse / rtn |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['block']} | {r['matrix']} | {r['per_model']} | {r['rtn_s']} | {r['rtn_cpu_s']} | "
                  f"{r['mse_s']} | {r['mse_cpu_s']} | {r['mse_s'] / r['rtn_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
