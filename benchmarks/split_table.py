"""The tied table split by rows (`eight_bit_rows`) against one 8-bit and one 4-bit table, on a trained checkpoint.

    python benchmarks/split_table.py --model DIR [--share 0.05 --share 0.1 ...] [--markdown]

Each row is `phiedge build --target cpu` with the target's settings (GPTQ, calibrated, layer 0's qkv_proj at 8
bits) and the table as named, validated against transformers fp32 over the cpu target's held-out ids
(benchmarks/quality.py's `measure`); "table MB" is the bytes of the LM head's weights and scales, which a
decode step reads whole. One JSON line per row, or a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import measure  # noqa: E402


def table_bytes(model_file: Path) -> int:
    graph = onnx.load(str(model_file), load_external_data=False).graph
    heads = {name for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("lm_head")
             for name in n.input[1:3]}
    return sum(int({e.key: e.value for e in t.external_data}["length"]) for t in graph.initializer
               if t.name in heads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained tied checkpoint (phiedge train)")
    parser.add_argument("--share", type=float, action="append", help="eight_bit_rows values (default 0.05 0.1 0.2)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    settings = [("one 8-bit table (cpu target)", {}), ("one 4-bit table", {"lm_head_bits": 4})]
    settings += [(f"split, {share:.0%} of rows at 8 bits", {"lm_head_bits": 4, "eight_bit_rows": share})
                 for share in args.share or [0.05, 0.1, 0.2]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, int4 in settings:
            row = measure(args.model, Path(tmp), name, "int4", int4)
            if "error" not in row:
                row["table_bytes"] = table_bytes(Path(tmp) / "".join(c if c.isalnum() else "_" for c in name)
                                                 / "model.onnx")
            rows.append(row)
            if not args.markdown:
                print(json.dumps(row), flush=True)
    if args.markdown:
        base = rows[0]
        print("| table | weights MB | vs one 8-bit table | table MB | KL mean | KL p99 | top-1 | ppl ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            ratio = r["weight_bytes"] / base["weight_bytes"]
            print(f"| {r['setting']} | {r['weight_bytes'] / 1e6:.2f} | {ratio:.2f} | "
                  f"{r['table_bytes'] / 1e6:.2f} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['top1']:.4f} | "
                  f"{r['ppl_ratio']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
