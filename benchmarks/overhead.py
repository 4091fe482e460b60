"""How much does `phiedge bench`'s timing loop add? Its tg figure against a bare onnxruntime-genai loop.

    python benchmarks/overhead.py MODEL_DIR [--gen 128] [--rounds 7]

The harness times each decode step (`phiedge.bench.run_tg`: a perf_counter pair and get_next_tokens per
token); the bare loop is the one onnxruntime-genai's examples use, timed once around all steps. Both run
alternately in one process on the same model and context, so machine noise hits both. Prints one JSON line
per round and a summary line: tokens/s of each (mean ± stddev) and harness / bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from phiedge.bench.measure import generator, run_tg
from phiedge.bundle.generate import load


def bare_tg(model, context: list[int], n_gen: int) -> float:
    """Seconds for n_gen decode forward passes, timed by hand around the plainest loop (the first
    generate_next_token samples the prefill's logits, untimed as in run_tg)."""
    gen = generator(model, len(context) + n_gen + 1)
    gen.append_tokens(context)
    gen.generate_next_token()
    t0 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="built model folder (genai_config.json)")
    parser.add_argument("--gen", type=int, default=128, help="tokens generated per sample")
    parser.add_argument("--rounds", type=int, default=7, help="samples of each, alternating")
    args = parser.parse_args()
    model, _ = load(args.model)
    context = [5]
    run_tg(model, context, args.gen), bare_tg(model, context, args.gen)  # warm-up
    harness, bare = [], []
    for i in range(args.rounds):
        h = args.gen / sum(run_tg(model, context, args.gen))
        b = args.gen / bare_tg(model, context, args.gen)
        harness.append(h), bare.append(b)
        print(json.dumps({"round": i, "harness_ts": round(h, 3), "bare_ts": round(b, 3)}), flush=True)
    print(json.dumps({"model": args.model, "n_gen": args.gen, "rounds": args.rounds,
                      "harness_ts": statistics.mean(harness), "harness_stddev": statistics.stdev(harness),
                      "bare_ts": statistics.mean(bare), "bare_stddev": statistics.stdev(bare),
                      "harness_over_bare": statistics.mean(harness) / statistics.mean(bare)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
