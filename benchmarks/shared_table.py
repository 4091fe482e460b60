"""Memory and speed of built model folders side by side: what one shared table costs at run time.

    python benchmarks/shared_table.py memory DIR [DIR ...] [-r 2]      # one process per folder and run
    python benchmarks/shared_table.py speed DIR [DIR ...] [-r 7]       # interleaved, in one process
    python benchmarks/shared_table.py gather                           # GatherBlockQuantized alone, rank 2 vs 3

memory: /proc/self/status (VmRSS, RssAnon, RssFile, VmHWM, in MB) after onnxruntime-genai loads the folder,
and after a 128-token prompt and 16 generated tokens. File-backed pages (RssFile) are the mapped weights
file: clean, dropped by the kernel under pressure. speed: pp and tg tokens/s with `phiedge bench`'s loops,
folder after folder in each repetition, so a busy machine slows all of them alike. gather: the embedding
lookup at Phi-4-mini's table, on its own [vocab, hidden] table and on the LM head's [vocab, blocks, blob]
weight as `--embeddings shared` wires it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        found = {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in f) if k in FIELDS}
    return {k: found[k] for k in FIELDS}


def memory_of(folder: str) -> dict:
    """Run in a fresh process (one per folder): load, then prefill and decode a little."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    loaded = status()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=160)
    gen = og.Generator(model, params)
    gen.append_tokens([(i * 7919) % 1000 + 10 for i in range(128)])
    for _ in range(16):
        gen.generate_next_token()
    return {"folder": folder, "loaded": loaded, "generated": status()}


def speed(folders: list[str], reps: int, pp: int, tg: int) -> dict:
    import onnxruntime_genai as og

    from phiedge.bench.measure import run_pp, run_tg

    models = {d: og.Model(d) for d in folders}
    ids = [(i * 7919) % 1000 + 10 for i in range(pp)]
    for model in models.values():  # warm-up
        run_pp(model, ids[:32])
        run_tg(model, ids[:8], 4)
    runs = {d: {f"pp{pp}": [], f"tg{tg}": []} for d in folders}
    for _ in range(reps):
        for d, model in models.items():
            runs[d][f"pp{pp}"].append(pp / run_pp(model, ids)[0])
            runs[d][f"tg{tg}"].append(tg / sum(run_tg(model, ids[:16], tg)))
    return {d: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in r.items()}
            for d, r in runs.items()}


def gather(reps: int = 30) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden, block, bits = 200064, 3072, 128, 8
    blocks, blob = hidden // block, block * bits // 8
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, (vocab, blocks, blob), dtype=np.uint8)
    scales = rng.random((vocab, blocks), dtype=np.float32)

    def session(shared: bool):
        attrs = dict(domain="com.microsoft", bits=bits, block_size=block)
        if shared:
            inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scales, "s"),
                     numpy_helper.from_array(np.array([vocab, blocks, 1], np.int64), "s3"),
                     numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat")]
            nodes = [helper.make_node("Reshape", ["s", "s3"], ["s_rows"]),
                     helper.make_node("GatherBlockQuantized", ["w", "ids", "s_rows"], ["rows"], quantize_axis=2,
                                      **attrs),
                     helper.make_node("Reshape", ["rows", "flat"], ["y"])]
        else:
            inits = [numpy_helper.from_array(weight.reshape(vocab, -1), "w"), numpy_helper.from_array(scales, "s")]
            nodes = [helper.make_node("GatherBlockQuantized", ["w", "ids", "s"], ["y"], **attrs)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, hidden])], inits)
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    sessions = {"own table (rank 2)": session(False), "LM head weight (rank 3)": session(True)}
    out = {}
    for n in (1, 512):
        ids = {"ids": rng.integers(0, vocab, (1, n)).astype(np.int64)}
        first, second = (s.run(["y"], ids)[0] for s in sessions.values())
        if not np.array_equal(first, second):
            raise SystemExit("the two lookups differ")
        times = {k: [] for k in sessions}
        for _ in range(reps):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(["y"], ids)
                times[k].append(time.perf_counter() - t)
        out[f"{n} tokens"] = {k: {"median_us": statistics.median(v) * 1e6, "best_us": min(v) * 1e6}
                              for k, v in times.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "speed", "gather", "_one"], help="what to measure")
    parser.add_argument("folders", nargs="*", help="built model folders")
    parser.add_argument("-r", "--repetitions", type=int, default=None, help="runs per folder (memory 2, speed 7)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens for speed")
    parser.add_argument("--tg", type=int, default=64, help="generated tokens for speed")
    args = parser.parse_args()
    if args.what == "_one":
        print(json.dumps(memory_of(args.folders[0])))
    elif args.what == "memory":
        for _ in range(args.repetitions or 2):
            for folder in args.folders:  # a fresh process each time: peak and resident memory are its own
                run = subprocess.run([sys.executable, __file__, "_one", folder], capture_output=True, text=True,
                                     check=True)
                print(run.stdout.strip(), flush=True)
    elif args.what == "speed":
        print(json.dumps(speed(args.folders, args.repetitions or 7, args.pp, args.tg), indent=1))
    else:
        print(json.dumps(gather(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
