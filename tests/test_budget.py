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
