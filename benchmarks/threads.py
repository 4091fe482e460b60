"""Why phiedge writes intra_op_num_threads into genai_config.json: tokens/s with 1 thread vs all cores.

    python benchmarks/threads.py                 # synth + build a 2-layer Phi-4-mini-width model first
    python benchmarks/threads.py MODEL_DIR       # or measure a built model folder

Prints one JSON line per (threads, test) with mean and stddev tokens/s over the repetitions, then a
line with the ratios. Both settings run alternately in one process, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from phiedge.bench.measure import run_pp, run_tg


def load(model_dir: str, threads: int | None, workdir: Path) -> og.Model:
    """threads None: no intra_op_num_threads at all, as the builder leaves genai_config.json."""
    view = workdir / f"threads-{threads or 'unset'}"
    view.mkdir()
    for f in Path(model_dir).iterdir():  # the same model files, only genai_config.json differs
        if f.name != "genai_config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((Path(model_dir) / "genai_config.json").read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    session.pop("intra_op_num_threads", None)
    if threads:
        session["intra_op_num_threads"] = threads
    (view / "genai_config.json").write_text(json.dumps(config))
    return og.Model(str(view))


def one_run(model: og.Model, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) for one prefill, then n_gen decode steps (phiedge bench's loops)."""
    prefill, _ = run_pp(model, prompt)
    return len(prompt) / prefill, n_gen / sum(run_tg(model, prompt, n_gen))


def default_model(workdir: Path) -> str:
    from phiedge.build.stages import build
    from phiedge.checkpoints.synth import Shrink, synth

    ckpt = workdir / "ckpt"
    synth("phi-4-mini", ckpt, Shrink(layers=2, vocab=32064))  # real width, 2 of 32 layers, smaller vocab
    build(ckpt, "cpu", workdir / "int4")
    return str(workdir / "int4")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="built model folder (default: make one)")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=128)
    parser.add_argument("-n", "--gen-tokens", type=int, default=64)
    parser.add_argument("-r", "--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or default_model(Path(tmp))
        settings = [None, 1, os.cpu_count() or 1]
        models = {t: load(model_dir, t, Path(tmp)) for t in settings}
        vocab = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"]
        prompt = np.random.default_rng(0).integers(0, min(vocab, 1000), args.prompt_tokens).tolist()
        samples = {t: {"pp": [], "tg": []} for t in settings}
        for t in settings:  # warm-up
            one_run(models[t], prompt, 4)
        for _ in range(args.reps):
            for t in settings:
                pp, tg = one_run(models[t], prompt, args.gen_tokens)
                samples[t]["pp"].append(pp)
                samples[t]["tg"].append(tg)
        for t in settings:
            for test, values in samples[t].items():
                print(json.dumps({"n_threads": t if t else "unset", "test": f"{test}{args.prompt_tokens if test == 'pp' else args.gen_tokens}",
                                  "avg_ts": round(statistics.mean(values), 2),
                                  "stddev_ts": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                                  "samples_ts": [round(v, 2) for v in values]}))
        hi = settings[-1]
        for lo in settings[:-1]:
            print(json.dumps({"ratio": f"{hi} threads / {lo or 'unset'}",
                              **{k: round(statistics.mean(samples[hi][k]) / statistics.mean(samples[lo][k]), 2)
                                 for k in ("pp", "tg")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
