"""LoRA adapters beside an int4 build: their size, their load time, what an active one costs in decode and prefill
speed, and their validation against transformers with PEFT.

    python benchmarks/lora.py CHECKPOINT -o WORK                  # two adapters with random weights (speed, size)
    python benchmarks/lora.py CHECKPOINT -o WORK --train          # two trained on stdlib packages (quality too)
    python benchmarks/lora.py CHECKPOINT -o WORK --rank 16 -r 5 --markdown

Builds CHECKPOINT for the cpu target with two PEFT adapters (every linear layer, --rank), then runs
`phiedge bench`'s pp and tg tests for the base and with each adapter active, interleaved repetition by repetition
in one loaded model; the ratio is taken within each repetition and reported as median (min-max). Load time:
onnxruntime-genai's Adapters.load of one file, median of 5. Prints one JSON object (or a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from phiedge.bench.measure import bench, plan_tests
from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.bundle.model_safety import load
from phiedge.checkpoints.lora_train import train_lora

PACKAGES = ("email", "asyncio")


def random_adapter(checkpoint: Path, out: Path, rank: int, seed: int) -> Path:
    """A PEFT adapter on every linear layer with random weights (PEFT's init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if out.exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return out


def load_ms(model_dir: Path, file: Path, reps: int = 5) -> float:
    import onnxruntime_genai as og

    model, _ = load(model_dir)
    times = []
    for i in range(reps):
        adapters = og.Adapters(model)
        start = time.perf_counter()
        adapters.load(str(file), f"a{i}")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--work", type=Path, required=True, help="folder for the adapters and the build")
    parser.add_argument("--train", action="store_true", help="train the adapters on stdlib packages (else random)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=512)
    parser.add_argument("-n", "--gen-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {}
    for i, name in enumerate(PACKAGES):
        out = args.work / f"adapter-{name}"
        if args.train and not out.exists():
            train_lora(args.checkpoint, out, name, rank=args.rank, alpha=2 * args.rank)
        folders[name] = out if args.train else random_adapter(args.checkpoint, out, args.rank, seed=i)
    built = args.work / "build"
    started = time.perf_counter()
    record = build(args.checkpoint, "cpu", built, BuildOptions(adapters=tuple((n, str(p)) for n, p in folders.items())),
                   force=True)
    build_s = time.perf_counter() - started
    records = bench(built, plan_tests([args.prompt_tokens], [args.gen_tokens], [0]), args.repetitions, 1,
                    adapters=list(PACKAGES))
    base = {r["test"]: r for r in records if r["adapter"] is None}
    speed = []
    for r in records:
        if r["adapter"] is None:
            continue
        ratios = [b / a for a, b in zip(r["samples_ns"], base[r["test"]]["samples_ns"])]  # time base / time adapter
        speed.append({"test": r["test"], "adapter": r["adapter"], "base_ts": round(base[r["test"]]["avg_ts"], 2),
                      "adapter_ts": round(r["avg_ts"], 2), "ratio_median": round(statistics.median(ratios), 3),
                      "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)})
    adapters = [{"name": a["name"], "size_bytes": a["size_bytes"], "rank": a["rank"], "matrices": a["matrices"],
                 "load_ms": round(load_ms(built, built / a["file"]), 2),
                 "kl_mean_vs_peft": a["validation"] and a["validation"]["kl_mean"],
                 "top1_vs_peft": a["validation"] and a["validation"]["top1"],
                 "passed": a["validation"] and a["validation"]["passed"]} for a in record["adapters"]]
    result = {"checkpoint": str(args.checkpoint), "trained": args.train, "rank": args.rank,
              "model_size_bytes": record["size_bytes"], "build_seconds": round(build_s, 1),
              "base_kl_mean": record["validation"] and record["validation"]["kl_mean"],
              "adapters": adapters, "speed": speed, "threads": records[0]["n_threads"], "cpu": records[0]["cpu_info"],
              "repetitions": args.repetitions}
    if not args.markdown:
        print(json.dumps(result, indent=2))
        return
    print("| adapter | file | load | KL vs PEFT | " + " | ".join(f"{s['test']} vs base" for s in speed[:2]) + " |")
    print("|---|---|---|---|---|---|")
    for a in adapters:
        cells = [f"{s['ratio_median']:.3f}x ({s['ratio_min']:.3f}-{s['ratio_max']:.3f})" for s in speed
                 if s["adapter"] == a["name"]]
        kl = f"{a['kl_mean_vs_peft']:.3g}" if a["kl_mean_vs_peft"] is not None else "-"
        print(f"| {a['name']} | {a['size_bytes'] / 1e6:.2f} MB | {a['load_ms']:.1f} ms | {kl} | " + " | ".join(cells)
              + " |")


if __name__ == "__main__":
    main()
