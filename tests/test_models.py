import pytest

from phiedge import catalog
from phiedge.errors import ConfigError
from phiedge.models import GB, int4_footprint, parse_size, recommend, rows


@pytest.mark.parametrize("text, expected", [("4GB", 4 * GB), ("4 GiB", 4 * GB), ("512MB", 512 * 1024**2),
                                            ("6", 6 * GB), ("1.5g", int(1.5 * GB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(ConfigError, match="cannot read"):
        parse_size("lots")


def test_footprint_follows_the_targets_int4_settings():
    mini = int4_footprint(catalog.find_variant("phi-4-mini"))
    assert mini["kv_cache"] == 2 * 32 * 8 * 128 * 4096 * 4  # layers x kv heads x head dim x tokens x fp32
    table = 200064 * 3072
    layers = (3836021760 - table) * (4 + 32 / 256) / 8  # the cpu target: 4 bits + an fp32 scale per 256
    assert mini["weights"] == int(layers + table * (8 + 32 / 256) / 8)  # one shared 8-bit table
    # the full Phi-4-mini built at block 128 held 2.346 GB of weights (benchmarks/RESULTS.md, "Calibration"); block
    # 256 halves the scales (58 MB), layer 0's 8-bit qkv_proj (not counted here) adds 8 MB
    assert abs(mini["weights"] / (2.346e9 - 0.058e9 - 0.008e9) - 1) < 0.01
    phone = int4_footprint(catalog.find_variant("phi-4-mini"), target="android")  # the cpu target's settings
    assert phone["weights"] == mini["weights"]
    at32 = int4_footprint(catalog.find_variant("phi-4-mini"), target="windows-dml")  # block 32: more scales
    assert at32["weights"] > mini["weights"]
    phi2 = catalog.find_variant("phi-2").config  # the builder's own path: an fp32 table
    assert int4_footprint(catalog.find_variant("phi-2"))["weights"] > phi2["vocab_size"] * phi2["hidden_size"] * 4


def test_recommend_picks_the_largest_that_fits_the_task():
    assert recommend("24GB", "math")["name"] in {"phi-4-reasoning", "phi-4-reasoning-plus"}
    assert recommend("24GB", "chat")["name"] == "phi-4"
    small = recommend("8GB", "math")
    assert small["name"] == "phi-4-mini-reasoning"
    assert catalog.find_variant(small["name"]).params < 5e9
    assert small["total_gb"] <= small["ram_budget_gb"]
    assert "math" in catalog.find_variant(small["name"]).tasks


def test_recommend_explains_when_nothing_fits():
    with pytest.raises(ConfigError, match="no math variant fits 3GB: the smallest, phi-4-mini-reasoning, needs 2.7 GB"):
        recommend("3GB", "math")
    with pytest.raises(ConfigError, match="unknown task"):
        recommend("8GB", "juggling")


def test_recommend_shortens_the_context_before_picking_a_smaller_model():
    r = recommend("4.5GB", "chat")
    assert r["context"] < 4096 and r["total_gb"] <= r["ram_budget_gb"]


def test_rows_cover_every_variant():
    names = {r["name"] for r in rows()}
    assert names == set(catalog.variants())
    assert all(("reason" in r) != r["buildable"] for r in rows())
