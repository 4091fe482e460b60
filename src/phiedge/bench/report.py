"""One record schema, every output format: md, csv, json, jsonl; and the ratio to an earlier run."""

from __future__ import annotations

import csv
import io
import json

from pydantic import ValidationError

from phiedge.artifacts import BenchRecord, problems
from phiedge.errors import PhiedgeError

MD_ALWAYS = ["test", "avg_ts", "stddev_ts", "ttft_ms", "latency_p50_ms", "latency_p99_ms", "peak_rss_bytes"]
MD_IF_VARYING = ["model_variant", "model_precision", "n_threads", "n_depth", "adapter"]


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def to_markdown(records: list[dict]) -> str:
    """The columns that matter, plus those that differ between records (as llama-bench does)."""
    varying = [c for c in MD_IF_VARYING if len({cell(r.get(c)) for r in records}) > 1]
    cols = [*varying, *MD_ALWAYS]
    head = ["t/s" if c == "avg_ts" else "±" if c == "stddev_ts" else c for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in records]
    first = records[0] if records else {}
    lines.append(f"\n{first.get('model_variant') or 'model'} {first.get('model_precision') or ''}, "
                 f"{first.get('n_threads')} threads, {first.get('cpu_info')}, onnxruntime-genai "
                 f"{first.get('onnxruntime_genai_version')}, {first.get('repetitions')} repetitions")
    lines += [f"{r['test']} with adapter {r['adapter']} (loaded in {r['adapter_load_ms']:.1f} ms): {r['ratio']:.3f}x "
              "the base's tokens/s, runs interleaved" for r in adapter_ratios(records)]
    return "\n".join(lines)


def adapter_ratios(records: list[dict]) -> list[dict]:
    """Each adapter record's tokens/s over the base's in the same test (the cost of an active LoRA adapter)."""
    base = {r["test"]: r for r in records if r.get("adapter") is None}
    return [{**r, "ratio": r["avg_ts"] / base[r["test"]]["avg_ts"]} for r in records
            if r.get("adapter") is not None and r["test"] in base]


def to_csv(records: list[dict]) -> str:
    out = io.StringIO()
    fields = list(records[0]) if records else []
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: cell(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    return out.getvalue().rstrip("\n")


def render(records: list[dict], fmt: str) -> str:
    if fmt == "md":
        return to_markdown(records)
    if fmt == "csv":
        return to_csv(records)
    if fmt == "json":
        return json.dumps(records, indent=2)
    return "\n".join(json.dumps(r) for r in records)


def compare(records: list[dict], old_path: str) -> list[dict]:
    """tokens/s now over tokens/s then, test by test (tests missing from either side are left out)."""
    try:
        with open(old_path) as f:
            rows = [BenchRecord.model_validate_json(line) for line in f if line.strip()]
        old = {(r.test, r.adapter): r for r in rows}
    except ValidationError as exc:
        raise PhiedgeError(f"cannot read {old_path} as phiedge bench JSON lines: {problems(exc)}") from None
    except (OSError, ValueError) as exc:
        raise PhiedgeError(f"cannot read {old_path} as phiedge bench JSON lines: {exc}") from None
    keys = [(r["test"], r.get("adapter")) for r in records]
    return [{"test": r["test"] + (f" ({k[1]})" if k[1] else ""), "avg_ts": r["avg_ts"], "old_avg_ts": old[k].avg_ts,
             "ratio": r["avg_ts"] / old[k].avg_ts} for r, k in zip(records, keys) if k in old]
