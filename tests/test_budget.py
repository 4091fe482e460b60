import json
import math
from pathlib import Path

import pytest

from phiedge import catalog
from phiedge.artifacts import ModelFolder
from phiedge.checks.budget import check, estimate
from phiedge.schema import Device


def test_estimate_counts_weight_files_and_kv_cache(builds):
    built = builds("phi-4-mini", "int4")
    usage = estimate(ModelFolder(built))
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


def test_weight_accounting_matches_the_files(builds, checkpoints):
    """Every byte of the weights file is an initializer, and the int4 matrices are at their ideal size."""
    from phiedge.checks.budget import weight_accounting

    built = builds("phi-4-mini", "int4")
    acct = weight_accounting(ModelFolder(built))
    assert acct["data_file_bytes"] == (built / "model.onnx.data").stat().st_size == acct["initializer_bytes"]
    block = json.loads((built / "phiedge_build.json").read_text())["int4"]["block_size"]
    assert block == 128  # the target's 256 does not divide the tests' 384-wide checkpoint: the plan's fallback
    assert acct["ideal_bytes"] == acct["initializer_bytes"] == ideal_bytes(checkpoints["phi-4-mini"], block)
    assert acct["model_files_bytes"] == acct["data_file_bytes"] + (built / "model.onnx").stat().st_size
    # the graph file is its nodes plus inline constants (LongRoPE's cos/sin caches for 131072 positions)
    assert acct["graph_constants_bytes"] > 0.9 * (built / "model.onnx").stat().st_size
    assert json.loads((built / "phiedge_build.json").read_text())["weights"] == acct


def ideal_bytes(checkpoint: str, block: int) -> int:
    """The cpu target's int4 weights of a checkpoint, from its config's shapes alone: each matrix at its bits a
    weight plus one fp32 scale a block of `block` (symmetric: no zero points), the tied table once at the LM
    head's 8 bits (shared), layer 0's qkv_proj at 8 bits, norms in fp32."""
    from phiedge.checkpoints.checkpoint import parameter_shapes

    int4 = catalog.find_target("cpu").int4
    assert (int4.block_size, int4.symmetric, int4.embeddings, int4.lm_head_bits, int4.eight_bit) == \
        (256, True, "shared", 8, ["model.layers.0.self_attn.qkv_proj"])

    def matrix(rows: int, cols: int, bits: int) -> int:
        return rows * cols * bits // 8 + rows * math.ceil(cols / block) * 4

    total = 0
    for name, shape in parameter_shapes(json.loads((Path(checkpoint) / "config.json").read_text())).items():
        if name == "model.embed_tokens.weight":
            total += matrix(*shape, 8)
        elif name == "model.layers.0.self_attn.qkv_proj.weight":
            total += matrix(*shape, 8)
        else:
            total += matrix(*shape, 4) if len(shape) == 2 else 4 * math.prod(shape)
    return total
