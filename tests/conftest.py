"""Shared fixtures: small Phi-shaped checkpoints made here, and their builds (made once per session)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.checkpoints.train import train

TRAIN_STEPS = 300  # enough for sharp distributions (held-out perplexity far below uniform) in ~2 minutes

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


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A real 1 MiB file system (tmpfs): writes past it fail with ENOSPC, as on a full disk. Mounting needs
    root (or CAP_SYS_ADMIN); elsewhere the tests that use it are skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                                 text=True, timeout=30)
        why = mounted.stderr.strip() if mounted.returncode else None
    except OSError as exc:  # no mount program
        why = str(exc)
    if why is not None:
        pytest.skip(f"cannot mount a small tmpfs here: {why}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: synth(name, root / name, shrink, seed=1)["path"] for name, shrink in SHAPES.items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> str:
    """A Phi-4-mini-shaped model trained here on stdlib source: quality numbers mean something on it."""
    return train(tmp_path_factory.mktemp("trained") / "model", steps=TRAIN_STEPS)["path"]


@pytest.fixture(scope="session")
def builds(tmp_path_factory, checkpoints, request) -> dict:
    """(variant or "trained", precision, target) -> built (and validated) model folder, built on first use."""
    root = tmp_path_factory.mktemp("builds")
    made: dict = {}

    def get(variant: str, precision: str, target: str = "cpu"):
        key = (variant, precision, target)
        if key not in made:
            source = request.getfixturevalue("trained") if variant == "trained" else checkpoints[variant]
            out = root / f"{variant}-{precision}-{target}"
            build(source, target, out, BuildOptions(precision=precision))
            made[key] = out
        return made[key]

    return get
