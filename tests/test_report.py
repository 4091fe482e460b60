import csv
import io
import json

import pytest

from phiedge.bench.report import compare, render
from phiedge.errors import PhiedgeError

RECORDS = [
    {"test": "pp16", "avg_ts": 100.0, "stddev_ts": 2.0, "n_depth": 0, "ttft_ms": 3.5, "latency_p50_ms": None,
     "latency_p99_ms": None, "peak_rss_bytes": 10, "model_variant": "phi-4-mini", "model_precision": "int4",
     "n_threads": 2, "model_int4": {"block_size": 32}, "samples_ts": [99.0, 101.0]},
    {"test": "tg8 @ d32", "avg_ts": 50.0, "stddev_ts": 1.0, "n_depth": 32, "ttft_ms": None, "latency_p50_ms": 20.0,
     "latency_p99_ms": 25.0, "peak_rss_bytes": 10, "model_variant": "phi-4-mini", "model_precision": "int4",
     "n_threads": 2, "model_int4": {"block_size": 32}, "samples_ts": [49.0, 51.0]},
]


def test_formats_hold_the_same_numbers():
    as_json = json.loads(render(RECORDS, "json"))
    as_jsonl = [json.loads(line) for line in render(RECORDS, "jsonl").splitlines()]
    as_csv = list(csv.DictReader(io.StringIO(render(RECORDS, "csv"))))
    assert as_json == as_jsonl == RECORDS
    assert [float(r["avg_ts"]) for r in as_csv] == [100.0, 50.0]
    assert json.loads(as_csv[0]["model_int4"]) == {"block_size": 32}
    md = render(RECORDS, "md")
    assert "| 0 | pp16 | 100.00 | 2.00 | 3.50 |" in md
    assert "model_variant" not in md.splitlines()[0]  # the same in every record: not a column


def test_compare_gives_ratios_test_by_test(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text(render([{**RECORDS[0], "avg_ts": 80.0}], "jsonl"))
    assert compare(RECORDS, str(old)) == [{"test": "pp16", "avg_ts": 100.0, "old_avg_ts": 80.0, "ratio": 1.25}]
    old.write_text("not json")
    with pytest.raises(PhiedgeError, match="cannot read"):
        compare(RECORDS, str(old))
