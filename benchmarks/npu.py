"""The snapdragon-npu target against the cpu target on one checkpoint: build time and peak memory, size, validation
against transformers (the NPU build on the QNN HTP simulator), greedy agreement of the two builds, and the
simulator's speed (not a device's: the simulator emulates the HTP on this CPU).

    python benchmarks/npu.py CHECKPOINT -o WORK [--context-cap 128] [-r 3]

Each build runs in a child process (`phiedge build`), so its peak RSS is its own (with the Olive child it waits
for). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from phiedge.bench.measure import BenchTest, bench
from phiedge.bundle.generate import generate
from phiedge.bundle.model_safety import load
from phiedge.checkpoints import tokenizer_files
from phiedge.checks.greedy import PROMPTS, common_prefix


def timed_build(checkpoint: Path, target: str, out: Path, cap: int | None) -> dict:
    """`phiedge build` in a child: wall seconds and the child's peak RSS."""
    command = [str(Path(sys.executable).parent / "phiedge"), "build", "--target", target, "--model", str(checkpoint),
               "-o", str(out), "--force", "-q"] + (["--context-cap", str(cap)] if cap else [])
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak (and its Olive child's, which it waits for)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"phiedge build --target {target} failed")
    record = json.loads((out / "phiedge_build.json").read_text())
    v = record["validation"] or {}
    return {"target": target, "build_seconds": round(seconds, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),
            "size_bytes": sum(p.stat().st_size for p in out.iterdir() if p.name.endswith((".onnx", ".data", ".bin"))),
            "max_length": record["runtime"]["max_length"],
            **{k: v.get(k) for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio", "greedy", "passed")}}


def greedy_agreement(npu_dir: Path, cpu_dir: Path, checkpoint: Path, tokens: int = 16) -> list[dict]:
    tokenizer = tokenizer_files.load(checkpoint)
    models = {"npu": load(npu_dir)[0], "cpu": load(cpu_dir)[0]}
    rows = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        replies = {name: list(generate(m, ids, tokens)) for name, m in models.items()}
        rows.append({"prompt": text, "common_prefix": common_prefix(replies["npu"], replies["cpu"]), "of": tokens})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--work", type=Path, required=True, help="folder for the two builds")
    parser.add_argument("--context-cap", type=int, default=None, help="the NPU build's KV length (default: target's)")
    parser.add_argument("-r", "--reps", type=int, default=3, help="bench repetitions on the simulator")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    npu_dir, cpu_dir = args.work / "npu", args.work / "cpu"
    builds = [timed_build(args.checkpoint, "snapdragon-npu", npu_dir, args.context_cap),
              timed_build(args.checkpoint, "cpu", cpu_dir, None)]
    speed = {r["test"]: {"avg_ts": round(r["avg_ts"], 2), "stddev_ts": round(r["stddev_ts"], 2)}
             for r in bench(npu_dir, [BenchTest(64, 0), BenchTest(0, 16)], reps=args.reps)}
    print(json.dumps({"checkpoint": str(args.checkpoint), "builds": builds,
                      "size_npu_over_cpu": round(builds[0]["size_bytes"] / builds[1]["size_bytes"], 3),
                      "greedy_npu_vs_cpu": greedy_agreement(npu_dir, cpu_dir, args.checkpoint),
                      "simulator_speed": speed}, indent=2))


if __name__ == "__main__":
    main()
