"""llama.cpp's 4-bit GGUF quantizations against phiedge's ONNX int4 builds, on one trained model.

    pip install llama-cpp-python gguf                 # compiles llama.cpp (several minutes on 2 cores)
    python benchmarks/llamacpp.py                     # trains the stdlib model first (~10-15 min on 2 cores)
    python benchmarks/llamacpp.py --model DIR         # or reuse a checkpoint trained with the same shape
    python benchmarks/llamacpp.py --model DIR --markdown
    python benchmarks/llamacpp.py --model DIR --llama-cpp-bin build-llama/bin   # also the imatrix rows

The imatrix rows need llama.cpp's own tools, which the llama-cpp-python wheel does not ship; from the sdist's
vendor/llama.cpp (a few minutes on 2 cores):

    cmake -S vendor/llama.cpp -B build-llama -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build-llama --target llama-imatrix llama-quantize -j 2

The model is Phi-4-mini-shaped (Phi3ForCausalLM, head 128, partial rotary 0.75, LongRoPE, tied
embeddings) with 2 layers, hidden 768 (6 query, 2 KV heads), MLP 1536 and vocabulary 4096: every width a
multiple of 256, so llama.cpp's K-quants apply as on the real model.

llama.cpp side: the checkpoint is converted to an f32 GGUF by the `convert_hf_to_gguf.py` of the
llama-cpp-python sdist that matches the installed version (downloaded with pip unless --llama-cpp-src
names an unpacked `vendor/llama.cpp`), then quantized by llama.cpp itself to Q4_0, Q4_K_S and Q4_K_M, and
with --llama-cpp-bin each of them again with an importance matrix: `llama-imatrix` over the calibration text
phiedge's `--calibrate` reads (the first 8192 tokens of the stdlib training split: 16 chunks of 512), then
`llama-quantize --imatrix`. The only
change to the converter: a locally trained tokenizer's pre-tokenizer hash is unknown to it, so an
unrecognized hash is read as "gpt-2" (phiedge's tokenizer is byte-level BPE with GPT-2's split regex).
Logits come from llama-cpp-python with an f32 KV cache, so only the weights differ from the reference.

phiedge side: `benchmarks/quality.py`'s `measure` (phiedge build for the cpu target with the settings named,
phiedge validate); `--calibrate` rows use the same calibration text as the imatrix.

Every runtime gets the same 2048 held-out token ids in windows of 512 (inputs ids[s:s+512], targets
ids[s+1:s+513], each window from an empty cache) and is compared with transformers fp32: KL(reference ||
runtime) mean and p99, top-1 agreement, perplexity ratio. Sizes: GGUF file bytes; for ONNX the weights
(initializers without the rotary cos/sin caches) and the whole folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import measure  # noqa: E402

from phiedge.checkpoints.synth import Shrink
from phiedge.checks.validate import Sums, accumulate

SHRINK = Shrink(layers=2, heads=6, kv_heads=2, intermediate=1536, vocab=4096)
EVAL_TOKENS, WINDOW = 2048, 512
# Every setting but the default starts from round to nearest, uncalibrated, no 8-bit layer matrices, whatever the
# cpu target's defaults are at the time: a row means what its name says at every commit
PLAIN = {"quantizer": "rtn", "calibrate": False, "eight_bit": []}
SETTINGS = [  # (name, precision, int4 overrides of PLAIN)
    ("b128 rtn, int8 table", "int4", {"block_size": 128, "quantizer": "rtn", "embeddings": "int8", "lm_head_bits": 4}),
    ("b128 mse, int8 table", "int4", {"block_size": 128, "quantizer": "mse", "embeddings": "int8", "lm_head_bits": 4}),
    ("b128 mse --calibrate, int8 table", "int4",
     {"block_size": 128, "quantizer": "mse", "calibrate": True, "embeddings": "int8", "lm_head_bits": 4}),
    ("b128 rtn, one shared 8-bit table", "int4", {"block_size": 128, "embeddings": "shared", "lm_head_bits": 8}),
    ("b128 mse, one shared 8-bit table", "int4",
     {"block_size": 128, "quantizer": "mse", "embeddings": "shared", "lm_head_bits": 8}),
    ("b128 mse --calibrate, one shared 8-bit table", "int4",
     {"block_size": 128, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8}),
    ("b128 mse --calibrate, one shared 8-bit table, 8-bit qkv_proj", "int4",
     {"block_size": 128, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8,
      "eight_bit": ["model.layers.*.self_attn.qkv_proj"]}),
    *[(f"b128 mse --calibrate, one shared 8-bit table, 8-bit qkv_proj in layer {i}", "int4",
       {"block_size": 128, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8,
        "eight_bit": [f"model.layers.{i}.self_attn.qkv_proj"]}) for i in (0, 1)],
    ("b256 mse --calibrate, one shared 8-bit table, 8-bit qkv_proj", "int4",
     {"block_size": 256, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8,
      "eight_bit": ["model.layers.*.self_attn.qkv_proj"]}),
    ("b64 mse --calibrate, one shared 8-bit table", "int4",
     {"block_size": 64, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8}),
    ("b32 mse, int8 table (the phone targets before GPTQ)", "int4",
     {"block_size": 32, "quantizer": "mse", "embeddings": "int8", "lm_head_bits": 4}),
    ("b32 mse --calibrate, int8 table", "int4",
     {"block_size": 32, "quantizer": "mse", "calibrate": True, "embeddings": "int8", "lm_head_bits": 4}),
    ("b32 mse --calibrate, one shared 8-bit table, 8-bit qkv_proj in layer 0", "int4",
     {"block_size": 32, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8,
      "eight_bit": ["model.layers.0.self_attn.qkv_proj"]}),
    ("b32 mse --calibrate, one shared 8-bit table", "int4",
     {"block_size": 32, "quantizer": "mse", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8}),
    *[(f"b{block} gptq, one shared 8-bit table{qkv}", "int4",
       {"block_size": block, "quantizer": "gptq", "calibrate": True, "embeddings": "shared", "lm_head_bits": 8,
        "eight_bit": ["model.layers.0.self_attn.qkv_proj"] if qkv else []})
      for block in (256, 128, 64, 32) for qkv in ("", ", 8-bit qkv_proj in layer 0")],
    *[(f"b256 gptq, split table ({round(rows * 100)}% rows at 8 bits), 8-bit qkv_proj in layer 0", "int4",
       {"block_size": 256, "quantizer": "gptq", "calibrate": True, "embeddings": "shared", "lm_head_bits": 4,
        "eight_bit_rows": rows, "eight_bit": ["model.layers.0.self_attn.qkv_proj"]}) for rows in (0.05, 0.1, 0.2)],
    *[(f"b{block} gptq, split table (10% rows at 8 bits), 8-bit qkv_proj in layer 0", "int4",
       {"block_size": block, "quantizer": "gptq", "calibrate": True, "embeddings": "shared", "lm_head_bits": 4,
        "eight_bit_rows": 0.1, "eight_bit": ["model.layers.0.self_attn.qkv_proj"]}) for block in (64, 32)],
    ("b256 gptq, one shared 4-bit table, 8-bit qkv_proj in layer 0", "int4",
     {"block_size": 256, "quantizer": "gptq", "calibrate": True, "embeddings": "shared", "lm_head_bits": 4,
      "eight_bit": ["model.layers.0.self_attn.qkv_proj"]}),
]
ONNX_SETTINGS = [  # (name, precision, int4 overrides of the cpu target)
    ("fp32", "fp32", {}),
    ("phiedge default (cpu target)", "int4", {}),
    *[(name, precision, {**PLAIN, **int4}) for name, precision, int4 in SETTINGS],
]
GGUF_SETTINGS = ["f32", "Q4_0", "Q4_K_S", "Q4_K_M"]  # f32 is the converter's output, the others llama.cpp's quantizer's
IMATRIX_CHUNKS = 16  # of WINDOW tokens: twice phiedge's calibrate.TOKENS (the tables' llama.cpp rows kept this)


def require() -> None:
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"benchmarks/llamacpp.py needs {' and '.join(missing)}: pip install llama-cpp-python gguf")


def llama_cpp_source(workdir: Path) -> Path:
    """vendor/llama.cpp of the sdist matching the installed llama-cpp-python (converter and gguf-py)."""
    import llama_cpp

    version = llama_cpp.__version__
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    f"llama-cpp-python=={version}", "-d", str(workdir)], check=True)
    sdist = next(workdir.glob(f"llama_cpp_python-{version}.tar.gz"))
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, members=[m for m in tar.getmembers() if m.name.startswith(wanted)], filter="data")
    return workdir / prefix


def convert_f32(model_dir: str, src: Path, out: Path) -> None:
    """Run the sdist's convert_hf_to_gguf.py in this process, tolerating an unknown BPE pre-tokenizer."""
    if "gguf" in sys.modules:  # the converter must import its own gguf-py, as it does from the command line
        sys.exit("gguf was imported before the converter; run this script in a fresh process")
    sys.path.insert(0, str(src))  # for the `conversion` package; the converter adds gguf-py itself
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", src / "convert_hf_to_gguf.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # hash of a tokenizer trained here; byte-level BPE with GPT-2's regex
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    try:
        converter.main()
    finally:
        sys.argv, TextModel.get_vocab_base_pre = argv, known


def quantize(src: Path, out: Path, setting: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{setting}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {setting} failed")


def calibration_text(out: Path) -> Path:
    """The training split's files as one text, in the order phiedge's calibration reads them: llama-imatrix
    tokenizes it with the GGUF's copy of the same tokenizer and takes its first IMATRIX_CHUNKS windows."""
    from phiedge.checkpoints.corpus import split_files

    out.write_text("\n".join(f.read_text(encoding="utf-8", errors="replace") for f in split_files()[0][:40]),
                   encoding="utf-8")
    return out


def imatrix(binaries: Path, f32: Path, text: Path, out: Path) -> None:
    subprocess.run([str(binaries / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(WINDOW),
                    "--chunks", str(IMATRIX_CHUNKS), "-t", "2", "--no-ppl"], check=True, stdout=sys.stderr,
                   stderr=subprocess.STDOUT)


def quantize_with(binaries: Path, src: Path, out: Path, setting: str, matrix: Path) -> None:
    subprocess.run([str(binaries / "llama-quantize"), "--imatrix", str(matrix), str(src), str(out), setting, "2"],
                   check=True, stdout=sys.stderr, stderr=subprocess.STDOUT)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds: a K-quant must not have fallen back silently."""
    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def windows(ids: list[int]):
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start:start + WINDOW + 1]
        if len(chunk) >= 2:
            yield chunk[:-1], np.array(chunk[1:])


def reference_logits(model_dir: str, ids: list[int]) -> list[np.ndarray]:
    import torch

    from phiedge.checkpoints.fp32 import load_reference

    reference = load_reference(model_dir)
    with torch.no_grad():
        return [reference(torch.tensor([inputs])).logits[0].numpy() for inputs, _ in windows(ids)]


def gguf_logits(path: Path, ids: list[int]) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2 * WINDOW, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for inputs, _ in windows(ids):
        llm.reset()  # the next eval clears the KV cache from position 0
        llm.eval(inputs)
        out.append(np.array(llm.scores[:len(inputs)]))
    llm.close()
    return out


def metrics(refs: list[np.ndarray], outs: list[np.ndarray], ids: list[int]) -> dict:
    sums = Sums(kl=[])
    for ref, out, (_, targets) in zip(refs, outs, windows(ids)):
        vocab = min(ref.shape[-1], out.shape[-1])
        accumulate(sums, ref[:, :vocab], out[:, :vocab], targets)
    kl = np.array(sums.kl)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "top1": sums.top1 / sums.n,
            "ppl_ratio": float(np.exp((sums.nll_built - sums.nll_ref) / sums.n)), "positions": sums.n}


def markdown(rows: list[dict]) -> str:
    base = {r["runtime"]: r["size_bytes"] for r in rows if r["setting"] in ("fp32", "f32")}
    lines = ["| runtime | setting | size MB | vs own fp32 | ONNX folder MB | KL mean | KL p99 | top-1 | ppl ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r['setting']} | failed: {r['error'][-120:]} | | | | | | |")
            continue
        folder = f"{r['file_bytes'] / 1e6:.2f}" if r["runtime"] == "onnx (phiedge)" else ""
        lines.append(f"| {r['runtime']} | {r['setting']} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{r['size_bytes'] / base[r['runtime']]:.2f} | {folder} | {r['kl_mean']:.2e} | "
                     f"{r['kl_p99']:.2e} | {r['top1']:.4f} | {r['ppl_ratio']:.4f} |")
    lines += ["", "Size: GGUF file; ONNX weights (initializers without the rotary cos/sin caches)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained checkpoint (default: train one here, ~10-15 min on 2 cores)")
    parser.add_argument("--steps", type=int, default=600, help="training steps when no --model is given")
    parser.add_argument("--llama-cpp-src", type=Path,
                        help="an unpacked sdist's vendor/llama.cpp (default: pip download the installed version's)")
    parser.add_argument("--llama-cpp-bin", type=Path,
                        help="folder with llama.cpp's llama-imatrix and llama-quantize: adds the imatrix rows")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    parser.add_argument("--only", action="append",
                        help="phiedge settings whose name contains this text (repeatable: any; fp32 always runs)")
    args = parser.parse_args()
    require()
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if not args.markdown:
            print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from phiedge.checkpoints.train import train

            model_dir = str(train(tmp / "trained", shrink=SHRINK, steps=args.steps)["path"])
        from phiedge.checkpoints.corpus import eval_ids

        ids = eval_ids(model_dir, EVAL_TOKENS)
        src = args.llama_cpp_src or llama_cpp_source(tmp)
        paths = {s: tmp / f"model-{s}.gguf" for s in GGUF_SETTINGS}
        with contextlib.redirect_stdout(sys.stderr):  # the converter's and quantizer's chatter
            convert_f32(model_dir, src, paths["f32"])
            for setting in GGUF_SETTINGS[1:]:
                quantize(paths["f32"], paths[setting], setting)
            if args.llama_cpp_bin is not None:
                matrix = tmp / "imatrix.gguf"
                imatrix(args.llama_cpp_bin, paths["f32"], calibration_text(tmp / "calibration.txt"), matrix)
                for setting in GGUF_SETTINGS[1:]:
                    paths[f"{setting} imatrix"] = tmp / f"model-{setting}-imatrix.gguf"
                    quantize_with(args.llama_cpp_bin, paths["f32"], paths[f"{setting} imatrix"], setting, matrix)
        refs = reference_logits(model_dir, ids)
        for setting, path in paths.items():
            emit({"runtime": "llama.cpp", "setting": setting, "size_bytes": path.stat().st_size,
                  **metrics(refs, gguf_logits(path, ids), ids), "tensor_types": tensor_types(path)})
        for name, precision, int4 in ONNX_SETTINGS:
            if args.only and precision != "fp32" and not any(text in name for text in args.only):
                continue
            m = measure(model_dir, tmp, name, precision, int4)
            row = {"runtime": "onnx (phiedge)", "setting": name}
            if "error" in m:
                emit({**row, "error": m["error"]})
                continue
            emit({**row, "size_bytes": m["weight_bytes"], "file_bytes": m["file_bytes"],
                  **{k: m[k] for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio", "positions")}})
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
