"""phiedge against its peers on the same weights and threads: llama.cpp Q4_0 / Q4_K_M and Optimum + MatMulNBits.

    pip install llama-cpp-python gguf                # compiles llama.cpp (~17 min on 2 cores)
    python benchmarks/peers.py                       # synth Phi-4-mini's real layer shape with 4 layers
    python benchmarks/peers.py --model DIR --markdown --threads 2

The checkpoint has Phi-4-mini's real layer shape (hidden 3072, 24 heads, 8 KV heads, intermediate 8192,
vocabulary 200064, tied embeddings, LongRoPE) and 4 of its 32 layers: every matmul has its real size.
Random weights: speed does not depend on their values.

Runtimes, each on the same checkpoint:
- phiedge: `phiedge build --target cpu` (the target's defaults), timed by phiedge's bench loops; also at
  block 32, and through the builder without prune_lm_head (logits for every prompt position);
- llama.cpp: converted by the llama-cpp-python sdist's `convert_hf_to_gguf.py`, quantized by llama.cpp to
  Q4_0 and Q4_K_M, run through llama-cpp-python (n_batch 512, the same threads for batch and decode);
- Optimum: `optimum-cli export onnx` (fp32, KV cache), then ONNX Runtime's MatMulNBitsQuantizer (block 32,
  symmetric, accuracy level 4), run by a plain onnxruntime loop feeding back the KV cache.

Tests follow llama-bench: pp N is one prefill of N random tokens from an empty cache, tg N is N single-token
decode steps from an empty cache; each after a warm-up run, repeated. Also measured in the same run: read
bandwidth of this machine with the same threads (numpy sums over 1 GiB, split across threads), and for each
runtime the weight bytes read per generated token (every matrix once; an embedding row is negligible), which
give the decode ceiling = bandwidth / bytes per token.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PP, TG = (128, 512), 128


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


def timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(reps)]


def summary(runtime: str, setting: str, test: str, tokens: int, seconds: list[float], **extra) -> dict:
    ts = [tokens / s for s in seconds]
    return {"runtime": runtime, "setting": setting, "test": test, "avg_ts": statistics.mean(ts),
            "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0, "samples_ts": [round(t, 2) for t in ts],
            **extra}


def ids_for(n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, 1000, n).tolist()


# --- phiedge -------------------------------------------------------------------------------------------------

def phiedge_build(model_dir: Path, out: Path, threads: int, *extra: str) -> Path:
    subprocess.run([str(Path(sys.executable).parent / "phiedge"), "build", "--target", "cpu", "--model", str(model_dir),
                    "-o", str(out), "--threads", str(threads), "--no-validate", "--force", "-q", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def builder_unpruned(model_dir: Path, out: Path, threads: int) -> Path:
    """The cpu target's int4 settings through the builder directly, with its default: logits for every
    prompt position (no prune_lm_head). Shows what pruning the LM head is worth."""
    import json as _json

    from onnxruntime_genai.models.builder import create_model

    from phiedge.catalog import find_target
    from phiedge.olive_config import builder_options

    t = find_target("cpu")
    options = {k: v for k, v in builder_options("int4", t.int4).items() if k != "precision"}
    with contextlib.redirect_stdout(sys.stderr):  # the builder prints progress; stdout carries results
        create_model("phi", str(model_dir), str(out), "int4", "cpu", str(out.parent / "builder-cache"),
                     hf_token="false", hf_remote=False, prune_lm_head=False, **options)
    config = _json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(_json.dumps(config))
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


def phiedge_speed(model_dir: Path, warmup: int, reps: int, setting: str = "cpu target") -> list[dict]:
    from phiedge.bench import run_pp, run_tg
    from phiedge.generate import load

    model, _ = load(str(model_dir))
    rows = []
    for n in PP:
        rows.append(summary("phiedge", setting, f"pp{n}", n,
                            timed(lambda n=n: run_pp(model, ids_for(n))[0], warmup, reps)))
    rows.append(summary("phiedge", setting, f"tg{TG}", TG,
                        timed(lambda: sum(run_tg(model, ids_for(1), TG)), warmup, reps)))
    return rows


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


def llama_speed(path: Path, setting: str, threads: int, warmup: int, reps: int) -> list[dict]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def pp(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids_for(n))
        return time.perf_counter() - t0

    def tg() -> float:
        llm.reset()
        total = 0.0
        for token in ids_for(TG):
            t0 = time.perf_counter()
            llm.eval([token])
            total += time.perf_counter() - t0
        return total

    rows = [summary("llama.cpp", setting, f"pp{n}", n, timed(lambda n=n: pp(n), warmup, reps)) for n in PP]
    rows.append(summary("llama.cpp", setting, f"tg{TG}", TG, timed(tg, warmup, reps)))
    llm.close()
    return rows


# --- Optimum + MatMulNBits -----------------------------------------------------------------------------------

def optimum_int4(model_dir: Path, work: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import onnx

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


def optimum_speed(path: Path, threads: int, warmup: int, reps: int) -> list[dict]:
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

    def tg() -> float:
        cache, total = dict(empty), 0.0
        for i, token in enumerate(ids_for(TG)):
            t0 = time.perf_counter()
            cache = step([token], cache, i)
            total += time.perf_counter() - t0
        return total

    rows = [summary("optimum+ort", "MatMulNBits b32 acc4", f"pp{n}", n, timed(lambda n=n: pp(n), warmup, reps))
            for n in PP]
    rows.append(summary("optimum+ort", "MatMulNBits b32 acc4", f"tg{TG}", TG, timed(tg, warmup, reps)))
    return rows


# --- report --------------------------------------------------------------------------------------------------

def markdown(rows: list[dict], meta: dict) -> str:
    base = {r["test"]: r["avg_ts"] for r in rows if (r["runtime"], r["setting"]) == ("phiedge", "cpu target")}
    tests = [f"pp{n}" for n in PP] + [f"tg{TG}"]
    head = "| runtime | setting | MB read / token | tg ceiling t/s | " + " | ".join(f"{t} t/s" for t in tests)
    head += " | " + " | ".join(f"{t} vs phiedge" for t in tests) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(tests))]
    keys = list(dict.fromkeys((r["runtime"], r["setting"]) for r in rows))
    for runtime, setting in keys:
        mine = {r["test"]: r for r in rows if (r["runtime"], r["setting"]) == (runtime, setting)}
        first = next(iter(mine.values()))
        speed = " | ".join(f"{mine[t]['avg_ts']:.1f} ± {mine[t]['stddev_ts']:.1f}" if t in mine else "" for t in tests)
        ratio = " | ".join(f"{mine[t]['avg_ts'] / base[t]:.2f}" if t in mine and t in base else "" for t in tests)
        lines.append(f"| {runtime} | {setting} | {first['bytes_per_token'] / 1e6:.0f} | "
                     f"{meta['bandwidth_bytes_s'] / first['bytes_per_token']:.1f} | {speed} | {ratio} |")
    lines += ["", f"{meta['threads']} threads, {meta['cpu_info']}; read bandwidth "
              f"{meta['bandwidth_bytes_s'] / 1e9:.1f} GB/s measured in the same run; {meta['reps']} repetitions "
              "after a warm-up; ratios are tokens/s over phiedge's."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: synth Phi-4-mini's shape, 4 layers)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime")
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test")
    parser.add_argument("--skip", action="append", default=[], choices=["llama.cpp", "optimum", "unpruned", "block32", "lm8"],
                        help="leave a peer out")
    parser.add_argument("--llama-cpp-src", type=Path, help="an unpacked sdist's vendor/llama.cpp")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    from phiedge.bench import cpu_info

    rows = []

    def emit(new: list[dict], **extra) -> None:
        for row in new:
            row.update(extra)
            rows.append(row)
            if not args.markdown:
                print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        model_dir = args.model
        if model_dir is None:
            from phiedge.synth import Shrink, synth

            log("synth phi-4-mini, 4 layers, real widths")
            model_dir = work / "checkpoint"
            synth("phi-4-mini", model_dir, Shrink(layers=4))
        meta = {"threads": args.threads, "cpu_info": cpu_info(), "reps": args.repetitions}
        log("memory bandwidth")
        meta["bandwidth_bytes_s"] = bandwidth(args.threads)
        log("phiedge build")
        built = phiedge_build(model_dir, work / "phiedge", args.threads)
        log("phiedge speed")
        emit(phiedge_speed(built, 1, args.repetitions), bytes_per_token=onnx_bytes_per_token(built / "model.onnx"))
        if "block32" not in args.skip:
            log("phiedge at block 32")
            b32 = phiedge_build(model_dir, work / "phiedge-b32", args.threads, "--block-size", "32")
            emit(phiedge_speed(b32, 1, args.repetitions, "cpu target at block 32"),
                 bytes_per_token=onnx_bytes_per_token(b32 / "model.onnx"))
        if "lm8" not in args.skip:
            log("phiedge with an 8-bit LM head")
            lm8 = phiedge_build(model_dir, work / "phiedge-lm8", args.threads, "--lm-head-bits", "8")
            emit(phiedge_speed(lm8, 1, args.repetitions, "cpu target, 8-bit LM head"),
                 bytes_per_token=onnx_bytes_per_token(lm8 / "model.onnx"))
        if "unpruned" not in args.skip:
            log("builder without prune_lm_head")
            unpruned = builder_unpruned(model_dir, work / "unpruned", args.threads)
            emit(phiedge_speed(unpruned, 1, args.repetitions, "cpu target, LM head on every prompt position"),
                 bytes_per_token=onnx_bytes_per_token(unpruned / "model.onnx"))
        if "llama.cpp" not in args.skip:
            log("llama.cpp convert and quantize")
            for setting, path in gguf_files(model_dir, work, args.llama_cpp_src).items():
                log(f"llama.cpp {setting} speed")
                emit(llama_speed(path, setting, args.threads, 1, args.repetitions),
                     bytes_per_token=gguf_bytes_per_token(path))
        if "optimum" not in args.skip:
            log("optimum export and MatMulNBits")
            path = optimum_int4(model_dir, work)
            log("optimum speed")
            emit(optimum_speed(path, args.threads, 1, args.repetitions), bytes_per_token=onnx_bytes_per_token(path))
    for row in rows:
        row.setdefault("threads", args.threads)
    if args.markdown:
        print(markdown(rows, meta))
    else:
        print(json.dumps({"meta": meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
