"""Shared fixtures: small Phi-shaped checkpoints made here, and their builds (made once per session)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from filelock import FileLock
from scripted import script

from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.checkpoints.lora_train import train_lora
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.checkpoints.train import train

TRAIN_STEPS = 150  # held-out perplexity 439 against a uniform 4096: sharp distributions, in under 2 minutes

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


def once(tmp_path_factory, name: str, make) -> Path:
    """A folder the whole run shares: made by make(path) in the first pytest-xdist worker that asks for it (the
    others wait on a file lock), then read by all. make writes atomically (phiedge's staged outputs), so a
    folder that exists is complete."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's root, above each worker's own
    path = root / "shared" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            make(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    return {name: str(once(tmp_path_factory, f"checkpoints/{name}", lambda path, name=name, shrink=shrink:
                           synth(name, path, shrink, seed=1)))
            for name, shrink in SHAPES.items()}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> str:
    """A Phi-4-mini-shaped model trained here on stdlib source: quality numbers mean something on it."""
    return str(once(tmp_path_factory, "trained", lambda path: train(path, steps=TRAIN_STEPS)))


ADAPTERS = ("email", "asyncio")  # LoRA adapters of the trained model, each on the stdlib package of its name


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, trained) -> dict[str, Path]:
    """PEFT LoRA adapters of the trained model (rank 8 on every linear layer), fine-tuned here on one package each."""
    return {name: once(tmp_path_factory, f"adapters/{name}", lambda path, name=name: train_lora(trained, path, name))
            for name in ADAPTERS}


@pytest.fixture(scope="session")
def lora_build(tmp_path_factory, trained, adapters) -> Path:
    """The trained model's int4 cpu build with both adapters (built and validated with them)."""
    options = BuildOptions(adapters=tuple((name, str(path)) for name, path in adapters.items()))
    return once(tmp_path_factory, "builds/trained-int4-cpu-lora", lambda out: build(trained, "cpu", out, options))


THINKING = ["<|im_sep|>", "<think>", "return", "</think>", "import", "<|im_end|>"]  # the prompt's last token first


@pytest.fixture(scope="session")
def thinking(tmp_path_factory) -> Path:
    """An fp32 build of a Phi-4-reasoning-shaped checkpoint whose weights script its greedy reply: a <think> block,
    then an answer (tests/scripted.py)."""

    def make(out: Path) -> None:
        source = out.parent / "thinking-checkpoint"
        synth("phi-4-reasoning", source, Shrink(layers=1, heads=2, kv_heads=1, intermediate=256, vocab=2048), seed=1,
              dtype="fp32", force=True)
        script(source, THINKING)
        build(str(source), "cpu", out, BuildOptions(precision="fp32"))

    return once(tmp_path_factory, "builds/thinking-fp32", make)


@pytest.fixture(scope="session")
def builds(tmp_path_factory, checkpoints, request) -> dict:
    """(variant or "trained", precision, target) -> built (and validated) model folder, built on first use."""

    def get(variant: str, precision: str, target: str = "cpu"):
        source = request.getfixturevalue("trained") if variant == "trained" else checkpoints[variant]
        return once(tmp_path_factory, f"builds/{variant}-{precision}-{target}",
                    lambda out: build(source, target, out, BuildOptions(precision=precision)))

    return get
