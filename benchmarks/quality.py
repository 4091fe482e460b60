"""int4 settings side by side on a model trained here: size against closeness to the original.

    python benchmarks/quality.py                      # trains the stdlib model (600 steps, ~4 min) first
    python benchmarks/quality.py --model DIR          # or use a checkpoint made by `phiedge train`
    python benchmarks/quality.py --markdown           # a table instead of JSON lines
    python benchmarks/quality.py --model DIR --only stream   # only the settings whose name has "stream"
    python benchmarks/quality.py --model DIR --only cpu-rtn  # Olive's Rtn pass (recipes/cpu-rtn.yaml)
    python benchmarks/quality.py --model DIR --only "(cpu target)" --only mse   # either text

Every setting is built for the cpu target by `phiedge build` and measured by `phiedge validate`'s code
on the same held-out token ids: KL(reference || built) mean and p99, top-1 agreement, perplexity ratio,
greedy agreement. Sizes: the whole folder, and the weights alone (without the rotary caches, which
dominate a tiny model's graph but not a real one's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from phiedge import catalog
from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.checks.validate import validate
from phiedge.errors import PhiedgeError

# (name, precision, int4 overrides of the cpu target[, recipe])
SETTINGS = [
    ("fp32", "fp32", {}),
    ("rtn b32 (builder default)", "int4", {"method": "builder", "algorithm": "default", "block_size": 32}),
    ("rtn b128", "int4", {"method": "builder", "algorithm": "default", "block_size": 128}),
    ("rtn b32 asymmetric", "int4", {"method": "builder", "algorithm": "default", "block_size": 32, "symmetric": False}),
    ("rtn b32 accuracy_level 1", "int4", {"method": "builder", "algorithm": "default", "block_size": 32, "accuracy_level": 1}),
    ("rtn b32 tied embedding shared int4", "int4", {"method": "builder", "algorithm": "rtn", "block_size": 32}),
    ("rtn b32 8-bit LM head", "int4", {"method": "builder", "algorithm": "rtn_last", "block_size": 32}),
    ("rtn b32 fp32 LM head", "int4", {"method": "builder", "algorithm": "default", "block_size": 32, "float_nodes": ["/lm_head/MatMul"]}),
    ("stream b128, int8 table (cpu target)", "int4", {"method": "stream", "block_size": 128, "embeddings": "int8"}),
    ("stream b128, float table", "int4", {"method": "stream", "block_size": 128, "embeddings": "float"}),
    ("stream b128, int4 table", "int4", {"method": "stream", "block_size": 128, "embeddings": "int4"}),
    ("stream b128, int8 table, 8-bit LM head", "int4",
     {"method": "stream", "block_size": 128, "embeddings": "int8", "lm_head_bits": 8}),
    ("stream b128, one shared table at 8 bits", "int4",
     {"method": "stream", "block_size": 128, "embeddings": "shared", "lm_head_bits": 8}),
    ("stream b128, one shared table at 4 bits", "int4", {"method": "stream", "block_size": 128, "embeddings": "shared"}),
    ("stream b32, int8 table (android, ios)", "int4", {"method": "stream", "block_size": 32, "embeddings": "int8"}),
    ("stream b32, int4 table", "int4", {"method": "stream", "block_size": 32, "embeddings": "int4"}),
    ("stream b32, int8 table, 8-bit LM head", "int4",
     {"method": "stream", "block_size": 32, "embeddings": "int8", "lm_head_bits": 8}),
    ("stream b128, int8 table, mse", "int4",
     {"method": "stream", "block_size": 128, "embeddings": "int8", "quantizer": "mse"}),
    ("stream b32, int8 table, mse", "int4",
     {"method": "stream", "block_size": 32, "embeddings": "int8", "quantizer": "mse"}),
    *[(f"stream b128, int8 table, mse, 8-bit {kind} (sensitivity)", "int4",
       {"method": "stream", "block_size": 128, "embeddings": "int8", "quantizer": "mse", **bits})
      for kind, bits in [("qkv_proj", {"eight_bit": ["model.layers.*.self_attn.qkv_proj"]}),
                         ("o_proj", {"eight_bit": ["model.layers.*.self_attn.o_proj"]}),
                         ("gate_up_proj", {"eight_bit": ["model.layers.*.mlp.gate_up_proj"]}),
                         ("down_proj", {"eight_bit": ["model.layers.*.mlp.down_proj"]}),
                         ("LM head", {"lm_head_bits": 8})]],
    ("stream b32, one shared table at 8 bits", "int4",
     {"method": "stream", "block_size": 32, "embeddings": "shared", "lm_head_bits": 8}),
    ("stream b32, one shared table at 4 bits", "int4", {"method": "stream", "block_size": 32, "embeddings": "shared"}),
    ("k-quant b32", "int4", {"method": "builder", "algorithm": "k_quant", "block_size": 32}),
    ("k-quant mixed b32", "int4", {"method": "builder", "algorithm": "k_quant_mixed", "block_size": 32}),
    ("k-quant mixed b128", "int4", {"method": "builder", "algorithm": "k_quant_mixed", "block_size": 128}),
    ("GPTQ b32 (Olive, stdlib calibration)", "int4", {"method": "builder", "algorithm": "default", "block_size": 32}, "cpu-gptq"),
    ("GPTQ b32 + 8-bit LM head", "int4", {"method": "builder", "algorithm": "rtn_last", "block_size": 32}, "cpu-gptq"),
    ("Olive Rtn b128 (recipe cpu-rtn)", "int4", {"method": "builder", "algorithm": "default", "block_size": 128}, "cpu-rtn"),
    ("Olive Rtn b32 (recipe cpu-rtn)", "int4", {"method": "builder", "algorithm": "default", "block_size": 32}, "cpu-rtn"),
]


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of every initializer but the rotary cos/sin caches."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if "cos_cache" in t.name or "sin_cache" in t.name:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def measure(model_dir: str, workdir: Path, name: str, precision: str, int4: dict, recipe: str | None = None) -> dict:
    out = workdir / "".join(c if c.isalnum() else "_" for c in name)
    try:
        build(model_dir, "cpu", out, BuildOptions(precision=precision, int4=int4, recipe=recipe, validate=False))
    except PhiedgeError as exc:  # a setting the builder cannot apply to this shape is a result too
        return {"setting": name, "precision": precision, "int4": int4, "error": str(exc)}
    settings = catalog.find_target("cpu").validation
    report = validate(out, model_dir, precision, settings.model_copy(update={"thresholds": {}}))
    m = report["metrics"]
    return {"setting": name, "precision": precision, "int4": int4, "recipe": recipe or "cpu", "file_bytes": report["size_bytes"],
            "weight_bytes": weight_bytes(out / "model.onnx"), "kl_mean": m["kl_mean"], "kl_p99": m["kl_p99"],
            "top1": m["top1"], "ppl_ratio": m["ppl_ratio"], "greedy": m["greedy"],
            "correct_token_prob_change": m["correct_token_prob_change"], "positions": m["positions"]}


def markdown(rows: list[dict]) -> str:
    base = next(r for r in rows if r["precision"] == "fp32")["weight_bytes"]
    lines = ["| setting | weights MB | vs fp32 | KL mean | KL p99 | top-1 | ppl ratio | greedy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error'][-120:]} | | | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['weight_bytes'] / 1e6:.2f} | {r['weight_bytes'] / base:.2f} | "
                     f"{r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['top1']:.4f} | {r['ppl_ratio']:.4f} | "
                     f"{r['greedy']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained checkpoint (default: train one with `phiedge train`'s code)")
    parser.add_argument("--steps", type=int, default=600, help="training steps when no --model is given")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    parser.add_argument("--only", action="append",
                        help="run only the settings whose name contains this text (repeatable: any; fp32 always runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from phiedge.checkpoints.train import train

            model_dir = train(Path(tmp) / "trained", steps=args.steps)["path"]
        rows = []
        for name, precision, int4, *recipe in SETTINGS:
            if args.only and not any(text in name for text in args.only) and precision != "fp32":
                continue
            row = measure(model_dir, Path(tmp), name, precision, int4, *recipe)
            rows.append(row)
            if not args.markdown:
                print(json.dumps(row), flush=True)
        if args.markdown:
            print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
