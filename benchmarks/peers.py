"""phiedge against its peers on the same weights and threads: llama.cpp Q4_0 / Q4_K_M and Optimum + MatMulNBits.

    pip install llama-cpp-python gguf                # compiles llama.cpp (~17 min on 2 cores)
    python benchmarks/peers.py                       # synth Phi-4-mini's real layer shape with 4 layers
    python benchmarks/peers.py --model DIR --markdown --threads 2 -r 5

The checkpoint has Phi-4-mini's real layer shape (hidden 3072, 24 heads, 8 KV heads, intermediate 8192,
vocabulary 200064, tied embeddings, LongRoPE) and 4 of its 32 layers: every matmul has its real size.
Random weights: speed does not depend on their values.

Runtimes, each on the same checkpoint:
- phiedge: `phiedge build --target cpu` (the target's defaults), timed by phiedge's bench loops; also at
  block 32, with an 8-bit LM head, with one 8-bit table for the embedding and the LM head (`--embeddings
  shared --lm-head-bits 8`), and without prune_lm_head (logits for every prompt position);
- llama.cpp: converted by the llama-cpp-python sdist's `convert_hf_to_gguf.py`, quantized by llama.cpp to
  Q4_0 and Q4_K_M, run through llama-cpp-python (n_batch 512, the same threads for batch and decode);
- Optimum: `optimum-cli export onnx` (fp32, KV cache), then ONNX Runtime's MatMulNBitsQuantizer (block 32,
  symmetric, accuracy level 4), run by a plain onnxruntime loop feeding back the KV cache.

Tests follow llama-bench: pp N is one prefill of N random tokens from an empty cache, tg N is N single-token
decode forward passes from an (almost: phiedge's has the one-token prompt) empty cache. Runtimes are interleaved:
each repetition loads every runtime in turn (alternating the order), runs one warm-up round of the tests, times
them once and unloads it, so that a change in the machine's load hits every runtime in the same repetition
(and only one model is in memory at a time). A ratio to phiedge is taken per repetition; the report gives its
median and range. Also measured in the same run: read bandwidth of this machine with the same threads (numpy
sums over 1 GiB, split across threads), and for each runtime the weight bytes read per generated token (every
matrix once; an embedding row is negligible), which give the decode ceiling = bandwidth / bytes per token.
Output: one JSON line per runtime, setting and test (every sample and every per-repetition ratio) and a last
line with the run's metadata (threads, CPU, bandwidth, load average, commit), or with --markdown a table
(--jsonl FILE keeps the JSON lines too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PP, TG = (128, 512), 128
TESTS = [f"pp{n}" for n in PP] + [f"tg{TG}"]
BASE = ("phiedge", "cpu target")  # what every ratio is taken against

Timers = tuple[Callable[[int], float], Callable[[int], float], Callable[[], None]]  # pp(n), tg(n) seconds; close


@dataclass(frozen=True)
class Peer:
    """A runtime and setting, ready to load: open() gives its timers, loading the model."""

    runtime: str
    setting: str
    bytes_per_token: int
    open: Callable[[], Timers]


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s read by `threads` threads summing their share of one large array (best of reps)."""
    data = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL in reductions
            best = max(best, data.nbytes / (time.perf_counter() - t0))
    return best


def run_test(timers: Timers, test: str) -> float:
    pp, tg, _ = timers
    return pp(int(test[2:])) if test.startswith("pp") else tg(int(test[2:]))


def measure(peers: list[Peer], warmup: int, reps: int) -> dict[tuple[str, str, str], list[float]]:
    """Seconds per (runtime, setting, test), one sample per repetition, every runtime in every repetition."""
    seconds: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(reps):
        for peer in peers if rep % 2 == 0 else peers[::-1]:
            log(f"repetition {rep + 1}/{reps}: {peer.runtime} {peer.setting}")
            timers = peer.open()
            try:
                for _ in range(warmup):
                    for test in TESTS:
                        run_test(timers, test)
                for test in TESTS:
                    seconds.setdefault((peer.runtime, peer.setting, test), []).append(run_test(timers, test))
            finally:
                timers[2]()
            del timers
    return seconds


def records(peers: list[Peer], seconds: dict[tuple[str, str, str], list[float]], threads: int) -> list[dict]:
    """Tokens/s per repetition, and the ratio to phiedge's cpu target within each repetition."""
    rows = []
    for peer in peers:
        for test in TESTS:
            tokens = int(test[2:])
            ts = [tokens / s for s in seconds[(peer.runtime, peer.setting, test)]]
            base = [tokens / s for s in seconds[(*BASE, test)]]
            ratios = [a / b for a, b in zip(ts, base)]
            rows.append({"runtime": peer.runtime, "setting": peer.setting, "test": test, "threads": threads,
                         "bytes_per_token": peer.bytes_per_token, "avg_ts": statistics.mean(ts),
                         "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                         "samples_ts": [round(t, 2) for t in ts], "ratio_samples": [round(r, 4) for r in ratios],
                         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios)})
    return rows


def commit() -> str | None:
    """The checkout's commit (with "-dirty" when it has changes), to state beside the numbers."""
    try:
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def ids_for(n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, 1000, n).tolist()


# --- phiedge -------------------------------------------------------------------------------------------------

def phiedge_build(model_dir: Path, out: Path, threads: int, *extra: str) -> Path:
    subprocess.run([str(Path(sys.executable).parent / "phiedge"), "build", "--target", "cpu", "--model", str(model_dir),
                    "-o", str(out), "--threads", str(threads), "--no-validate", "--force", "-q", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def phiedge_unpruned(model_dir: Path, out: Path, threads: int) -> Path:
    """The cpu target's build with the builder's default of logits for every prompt position: its recipe
    without prune_lm_head, all else (method stream, int8 table) equal. Shows what pruning the LM head is
    worth. (Through the builder directly, as before, the builder's own int4 path needs about 15 GB here.)"""
    from phiedge import catalog
    from phiedge.build.plan import BuildOptions
    from phiedge.build.stages import build

    load_recipe = catalog.load_recipe

    def unpruned(name: str) -> dict:
        recipe = load_recipe(name)
        for spec in recipe["passes"].values():
            if spec.get("type") == "ModelBuilder":
                spec.setdefault("extra_options", {})["prune_lm_head"] = False
        return recipe

    catalog.load_recipe = unpruned
    try:
        with contextlib.redirect_stdout(sys.stderr):
            build(model_dir, "cpu", out, BuildOptions(threads=threads, validate=False), force=True)
    finally:
        catalog.load_recipe = load_recipe
    return out


def onnx_bytes_per_token(model_path: Path) -> int:
    """Initializer bytes a decode step reads: all but the embedding table (one row) and rotary caches."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    multiplied = {name for n in model.graph.node if n.op_type == "MatMulNBits" for name in n.input}
    # the table (and its scales), not the ids, nor a table shared with the LM head, which reads all of it
    gathered = {name for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                for i, name in enumerate(n.input) if i != 1} - multiplied
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered or "cos_cache" in init.name or "sin_cache" in init.name:
            continue
        size = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        total += size if size is not None else len(init.raw_data)
    return total


def phiedge_peer(model_dir: Path, setting: str) -> Peer:
    from phiedge.bench.measure import run_pp, run_tg
    from phiedge.bundle.generate import load

    def open_() -> Timers:
        model, _ = load(str(model_dir))
        return (lambda n: run_pp(model, ids_for(n))[0]), (lambda n: sum(run_tg(model, ids_for(1), n))), lambda: None

    return Peer("phiedge", setting, onnx_bytes_per_token(model_dir / "model.onnx"), open_)


# --- llama.cpp -----------------------------------------------------------------------------------------------

def gguf_files(model_dir: Path, work: Path, src: Path | None) -> dict[str, Path]:
    """f32 GGUF by the converter (in a child process: it imports its own gguf-py), then Q4_0 and Q4_K_M."""
    code = ("import sys; sys.path.insert(0, %r); import llamacpp; from pathlib import Path; "
            "src = Path(%r) if %r else llamacpp.llama_cpp_source(Path(%r)); "
            "llamacpp.convert_f32(%r, src, Path(%r))") % (str(HERE), str(src), bool(src), str(work),
                                                          str(model_dir), str(work / "f32.gguf"))
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(HERE))
    from llamacpp import quantize

    files = {}
    for setting in ("Q4_0", "Q4_K_M"):
        files[setting] = work / f"{setting}.gguf"
        quantize(work / "f32.gguf", files[setting], setting)
    (work / "f32.gguf").unlink()
    return files


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor bytes: with tied embeddings llama.cpp reads token_embd whole as the output matrix."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def llama_peer(path: Path, setting: str, threads: int) -> Peer:
    def open_() -> Timers:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)

        def pp(n: int) -> float:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids_for(n))
            return time.perf_counter() - t0

        def tg(n: int) -> float:
            llm.reset()
            total = 0.0
            for token in ids_for(n):
                t0 = time.perf_counter()
                llm.eval([token])
                total += time.perf_counter() - t0
            return total

        return pp, tg, llm.close

    return Peer("llama.cpp", setting, gguf_bytes_per_token(path), open_)


# --- Optimum + MatMulNBits -----------------------------------------------------------------------------------

def optimum_int4(model_dir: Path, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32 = work / "optimum-fp32"
    subprocess.run([str(Path(sys.executable).parent / "optimum-cli"), "export", "onnx", "--model",
                    str(model_dir), "--task", "text-generation-with-past", "--no-post-process", str(fp32)],
                   check=True, stdout=subprocess.DEVNULL)
    model = onnx.load(str(fp32 / "model.onnx"))
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    with contextlib.redirect_stdout(sys.stderr):
        quantizer.process()
    out = work / "optimum-int4"
    out.mkdir()
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    del model, quantizer
    subprocess.run(["rm", "-rf", str(fp32)], check=True)
    return out / "model.onnx"


def optimum_peer(path: Path, threads: int) -> Peer:
    return Peer("optimum+ort", "MatMulNBits b32 acc4", onnx_bytes_per_token(path), lambda: optimum_timers(path, threads))


def optimum_timers(path: Path, threads: int) -> Timers:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values")]
    kv_heads, head = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
    outputs = [o.name for o in session.get_outputs()]

    def step(tokens: list[int], cache: dict, start: int) -> dict:
        n = len(tokens)
        feed = {"input_ids": np.array([tokens], dtype=np.int64),
                "attention_mask": np.ones((1, start + n), dtype=np.int64), **cache}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        result = dict(zip(outputs, session.run(None, feed)))
        return {name: result[name.replace("past_key_values", "present")] for name in past}

    empty = {name: np.zeros((1, kv_heads, 0, head), dtype=np.float32) for name in past}

    def pp(n: int) -> float:
        t0 = time.perf_counter()
        step(ids_for(n), dict(empty), 0)
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        cache, total = dict(empty), 0.0
        for i, token in enumerate(ids_for(n)):
            t0 = time.perf_counter()
            cache = step([token], cache, i)
            total += time.perf_counter() - t0
        return total

    return pp, tg, lambda: None


# --- report --------------------------------------------------------------------------------------------------

def markdown(rows: list[dict], meta: dict) -> str:
    head = "| runtime | setting | MB read / token | tg ceiling t/s | " + " | ".join(f"{t} t/s" for t in TESTS)
    head += " | " + " | ".join(f"{t} vs phiedge" for t in TESTS) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(TESTS))]
    for runtime, setting in dict.fromkeys((r["runtime"], r["setting"]) for r in rows):
        mine = {r["test"]: r for r in rows if (r["runtime"], r["setting"]) == (runtime, setting)}
        first = next(iter(mine.values()))
        speed = " | ".join(f"{mine[t]['avg_ts']:.1f} ± {mine[t]['stddev_ts']:.1f}" for t in TESTS)
        ratio = " | ".join(f"{mine[t]['ratio_median']:.2f} ({mine[t]['ratio_min']:.2f}–{mine[t]['ratio_max']:.2f})"
                           for t in TESTS)
        lines.append(f"| {runtime} | {setting} | {first['bytes_per_token'] / 1e6:.0f} | "
                     f"{meta['bandwidth_bytes_s'] / first['bytes_per_token']:.1f} | {speed} | {ratio} |")
    lines += ["", f"{meta['threads']} threads, {meta['cpu_info']}; read bandwidth "
              f"{meta['bandwidth_bytes_s'] / 1e9:.1f} GB/s measured in the same run; {meta['reps']} interleaved "
              "repetitions, each after a warm-up; tokens/s mean ± stddev; ratios are tokens/s over phiedge's "
              "cpu target within a repetition, median (min–max); "
              f"load average {meta['load_before']} before, {meta['load_after']} after; commit {meta['commit']}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: synth Phi-4-mini's shape, 4 layers)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime")
    parser.add_argument("-r", "--repetitions", type=int, default=5,
                        help="interleaved repetitions: each loads every runtime in turn and times each test once")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["llama.cpp", "optimum", "unpruned", "block32", "block128", "split"],
                        help="leave a peer out")
    parser.add_argument("--llama-cpp-src", type=Path, help="an unpacked sdist's vendor/llama.cpp")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    parser.add_argument("--jsonl", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args()
    from phiedge.bench.measure import cpu_info

    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        model_dir = args.model
        if model_dir is None:
            from phiedge.checkpoints.synth import Shrink, synth

            log("synth phi-4-mini, 4 layers, real widths")
            model_dir = work / "checkpoint"
            synth("phi-4-mini", model_dir, Shrink(layers=4))
        meta = {"threads": args.threads, "cpu_info": cpu_info(), "reps": args.repetitions, "commit": commit()}
        log("phiedge build")
        peers = [phiedge_peer(phiedge_build(model_dir, work / "phiedge", args.threads), "cpu target")]
        if "block32" not in args.skip:
            log("phiedge at block 32")
            b32 = phiedge_build(model_dir, work / "phiedge-b32", args.threads, "--block-size", "32")
            peers.append(phiedge_peer(b32, "cpu target at block 32"))
        if "block128" not in args.skip:
            log("phiedge at block 128")
            b128 = phiedge_build(model_dir, work / "phiedge-b128", args.threads, "--block-size", "128")
            peers.append(phiedge_peer(b128, "cpu target at block 128"))
        if "split" not in args.skip:
            log("phiedge with a split table")
            split = phiedge_build(model_dir, work / "phiedge-split", args.threads, "--lm-head-bits", "4",
                                  "--eight-bit-rows", "0.1")
            peers.append(phiedge_peer(split, "cpu target, split table (10% of rows at 8 bits)"))
        if "unpruned" not in args.skip:
            log("phiedge without prune_lm_head")
            unpruned = phiedge_unpruned(model_dir, work / "unpruned", args.threads)
            peers.append(phiedge_peer(unpruned, "cpu target, LM head on every prompt position"))
        if "llama.cpp" not in args.skip:
            log("llama.cpp convert and quantize")
            for setting, path in gguf_files(model_dir, work, args.llama_cpp_src).items():
                peers.append(llama_peer(path, setting, args.threads))
        if "optimum" not in args.skip:
            log("optimum export and MatMulNBits")
            peers.append(optimum_peer(optimum_int4(model_dir, work), args.threads))
        log("memory bandwidth")
        meta["bandwidth_bytes_s"] = bandwidth(args.threads)
        meta["load_before"] = round(os.getloadavg()[0], 1)
        seconds = measure(peers, 1, args.repetitions)
        meta["load_after"] = round(os.getloadavg()[0], 1)
        rows = records(peers, seconds, args.threads)
    lines = [json.dumps(row) for row in rows] + [json.dumps({"meta": meta})]
    if args.jsonl:
        args.jsonl.write_text("\n".join(lines) + "\n")
    print(markdown(rows, meta) if args.markdown else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
