"""Shared fixtures: small Phi-shaped checkpoints made here, and their builds (made once per session)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from phiedge.build import BuildOptions, build
from phiedge.synth import Shrink, synth

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Shrunk by heads, keeping each variant's head dimension (128, 96, 80) and rotary settings.
SHAPES = {
    "phi-4-mini": Shrink(layers=2, heads=3, kv_heads=1, intermediate=512, vocab=2048),  # GQA, partial rotary, LongRoPE, tied
    "phi-3-mini-4k": Shrink(layers=2, heads=4, intermediate=512, vocab=2048),
    "phi-2": Shrink(layers=2, heads=4, intermediate=640, vocab=2048),  # LayerNorm, partial rotary 0.4, biases
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: synth(name, root / name, shrink, seed=1)["path"] for name, shrink in SHAPES.items()}


@pytest.fixture(scope="session")
def builds(tmp_path_factory, checkpoints) -> dict:
    """(variant, precision) -> built model folder, built lazily on first use."""
    root = tmp_path_factory.mktemp("builds")
    made: dict = {}

    def get(variant: str, precision: str):
        key = (variant, precision)
        if key not in made:
            out = root / f"{variant}-{precision}"
            build(checkpoints[variant], "cpu", out, BuildOptions(precision=precision))
            made[key] = out
        return made[key]

    return get
