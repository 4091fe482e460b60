import struct

import pytest

from phiedge.bench.plot import plot
from phiedge.errors import PhiedgeError

RECORDS = [
    {"test": "pp16", "avg_ts": 100.0, "stddev_ts": 2.0, "n_threads": 2, "model_variant": "phi-4-mini",
     "model_precision": "int4", "cpu_info": "cpu"},
    {"test": "tg8", "avg_ts": 50.0, "stddev_ts": 1.0, "n_threads": 2, "model_variant": "phi-4-mini",
     "model_precision": "int4", "cpu_info": "cpu"},
]


def test_plot_writes_a_png_with_one_bar_per_test(tmp_path):
    out = tmp_path / "bench.png"
    drawn = plot(RECORDS, out)
    assert [(label, value) for label, value, _ in drawn] == [("pp16 (2 thr)", 100.0), ("tg8 (2 thr)", 50.0)]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 500 and height >= 150
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no partial file left


def test_unwritable_plot_path_is_one_error(tmp_path):
    with pytest.raises(PhiedgeError, match="cannot write"):
        plot(RECORDS, tmp_path / "missing" / "bench.png")
