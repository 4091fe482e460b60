import pytest

from phiedge.budget import check, estimate
from phiedge.schema import Device


def test_estimate_counts_weight_files_and_kv_cache(builds):
    built = builds("phi-4-mini", "int4")
    usage = estimate(built)
    weights = sum(p.stat().st_size for p in built.iterdir() if p.name.endswith((".onnx", ".onnx.data")))
    # shrunk phi-4-mini: 2 layers, 1 KV head of 128, fp32 cache, max_length 4096 (the cpu target's cap)
    assert usage == {"weights_bytes": weights, "kv_cache_bytes": 2 * 2 * 1 * 128 * 4096 * 4, "max_length": 4096,
                     "total_bytes": weights + 2 * 2 * 128 * 4096 * 4}


def test_budget_verdict_and_warning_with_numbers():
    usage = {"weights_bytes": 3_000_000_000, "kv_cache_bytes": 1_000_000_000, "max_length": 4096,
             "total_bytes": 4_000_000_000}
    verdict, warning = check(usage, Device(ram_gb=8, budget=0.5), "android")
    assert verdict["fits"] is True and verdict["budget_bytes"] == 4_000_000_000 and warning is None
    verdict, warning = check(usage, Device(ram_gb=6, budget=0.5), "ios")
    assert verdict["fits"] is False
    assert warning == ("does not fit the ios memory budget: weights 3.00 GB + KV cache 1.00 GB at 4096 tokens = "
                       "4.00 GB > 3.00 GB (50% of 6 GB); lower --context-cap or pick a smaller model")
    assert check(usage, None, "cpu") == ({**usage, "budget_bytes": None, "fits": None}, None)


@pytest.mark.parametrize("bad", [{"ram_gb": 0}, {"ram_gb": 8, "budget": 1.5}])
def test_device_values_are_checked(bad):
    with pytest.raises(ValueError):
        Device(**bad)


def test_weight_accounting_matches_the_files(builds):
    """Every byte of the weights file is an initializer, and the int4 matrices are at their ideal size."""
    from phiedge.budget import weight_accounting

    built = builds("phi-4-mini", "int4")
    acct = weight_accounting(built / "model.onnx")
    assert acct["data_file_bytes"] == (built / "model.onnx.data").stat().st_size == acct["initializer_bytes"]
    assert acct["ideal_bytes"] == acct["initializer_bytes"]  # 4 bits a weight + fp32 scales, nothing wasted
    assert acct["model_files_bytes"] == acct["data_file_bytes"] + (built / "model.onnx").stat().st_size
    # the graph file is its nodes plus inline constants (LongRoPE's cos/sin caches for 131072 positions)
    assert acct["graph_constants_bytes"] > 0.9 * (built / "model.onnx").stat().st_size
    import json

    assert json.loads((built / "phiedge_build.json").read_text())["weights"] == acct
