"""Greedy parity with transformers for every buildable variant in the catalog, shrunk."""

import json

import pytest
from conftest import SHAPES

from phiedge import catalog
from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.bundle.generate import generate, load
from phiedge.checkpoints.fp32 import load_reference
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.checks.greedy import common_prefix, reference_greedy

BUILDABLE = sorted(v.name for v in catalog.variants().values() if v.buildable)


def distinct_configs(names: list[str]) -> list[str]:
    """One variant per distinct config.json (a reasoning fine-tune ships its base's config): the same
    architecture need not be exported twice."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(json.dumps(catalog.find_variant(name).config, sort_keys=True), name)
    return sorted(seen.values())


def test_distinct_configs_keep_every_architecture_setting():
    kept = distinct_configs(BUILDABLE)
    assert {json.dumps(catalog.find_variant(n).config, sort_keys=True) for n in kept} == \
        {json.dumps(catalog.find_variant(n).config, sort_keys=True) for n in BUILDABLE}
    assert len(kept) < len(BUILDABLE)  # phi-4-mini-reasoning is phi-4-mini's config


def shrink_for(name: str) -> Shrink:
    cfg = catalog.find_variant(name).config
    group = cfg["num_attention_heads"] // (cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    heads = group if group > 1 else 2  # one KV head where the variant has GQA, else plain MHA
    return Shrink(layers=1, heads=heads, intermediate=256, vocab=2048)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


@pytest.mark.parametrize("name", distinct_configs(BUILDABLE))
def test_fp32_build_of_every_variant_matches_transformers(name, builds, tmp_path):
    if name in SHAPES:  # the session's fp32 build of its checkpoint (tests/conftest.py), which other tests share
        out = builds(name, "fp32")
    else:
        out, ckpt = tmp_path / "out", synth(name, tmp_path / "ckpt", shrink_for(name), seed=2)["path"]
        build(ckpt, "cpu", out, BuildOptions(precision="fp32"))
    v = json.loads((out / "phiedge_build.json").read_text())["validation"]
    assert v["enforced"] and v["passed"] and v["greedy"] == 1.0, v
    report = json.loads((out / "validation.json").read_text())
    assert all(r["agree"] == r["of"] == 32 for r in report["metrics"]["prompts"])


@pytest.mark.parametrize("name", ["phi-4-mini", "phi-3.5-mini"])
def test_longrope_prompt_longer_than_the_original_context(name, tmp_path):
    """Past original_max_position_embeddings both runtimes switch to LongRoPE's long factors."""
    ckpt = synth(name, tmp_path / "ckpt", shrink_for(name), seed=3)["path"]
    original = catalog.find_variant(name).config["original_max_position_embeddings"]
    out = tmp_path / "out"
    build(ckpt, "cpu", out, BuildOptions(precision="fp32", context_cap=original + 512, validate=False))
    import numpy as np

    prompt = np.random.default_rng(0).integers(0, 2000, original + 200).tolist()
    model, _ = load(str(out))
    built = list(generate(model, prompt, 16))
    ref = reference_greedy(load_reference(ckpt), prompt, 16)
    assert built == ref, f"agree {common_prefix(built, ref)} of 16"


@pytest.mark.parametrize("name", ["phi-4-mini", "phi-3-mini-4k"])
def test_layerwise_reference_gives_the_same_logits_and_tokens(checkpoints, name, monkeypatch):
    """One decoder layer in memory at a time: what lets a full-size build validate within its memory bound."""
    import torch

    from phiedge.checkpoints import fp32

    ckpt = checkpoints[name]
    whole, layerwise = load_reference(ckpt, layerwise=False), load_reference(ckpt, layerwise=True)
    ids = torch.arange(3, 203)[None]
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, layerwise(ids).logits)
    assert all(p.device.type == "meta" for p in layerwise.model.layers.parameters())  # dropped after each run
    assert reference_greedy(whole, [5, 6, 7], 12) == reference_greedy(layerwise, [5, 6, 7], 12)
    monkeypatch.setattr(fp32, "LAYERWISE_ABOVE_BYTES", 0)  # the size decides when not told
    assert all(p.device.type == "meta" for p in load_reference(ckpt).model.layers.parameters())
