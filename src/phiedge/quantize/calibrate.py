"""Importance for the mse search (`--calibrate`): each Linear input column's mean square over calibration text.

A weight's error reaches a layer's output multiplied by its input: with inputs x, the output error of a row
is sum_j dw_j x_j, whose expected square is (to first order, inputs uncorrelated) sum_j dw_j^2 E[x_j^2]. So
columns whose inputs are large deserve a closer fit. llama.cpp's `llama-imatrix` collects exactly these mean
squares (its importance matrix) and its quantizers weight their scale search by them; AWQ starts from the
same observation. phiedge collects them from the checkpoint itself, in fp32, with transformers' own modules:
the checkpoint runs over the calibration text one decoder layer at a time (fp32.load_reference's
layerwise mode: only the embedding table and one layer are in memory), a forward pre-hook on every Linear
adds up x^2 per input column, and the final norm's output gives the LM head's. The mse search
(quantizer.search_weights) multiplies its per-weight weights by them.

The result is a few MB (one float per input column of every matrix) written into the build folder as
IMPORTANCE, so that validation re-creates exactly the weights the build wrote (checks.dequantized).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from phiedge.checkpoints.corpus import calibration_ids
from phiedge.checkpoints.fp32 import load_reference
from phiedge.checkpoints.weights import Weights
from phiedge.errors import BuildError, ModelError
from phiedge.quantize.prequant import LM_HEAD, check_shapes, is_linear

IMPORTANCE = "phiedge_importance.safetensors"
METADATA = "phiedge_calibration"  # the safetensors metadata key holding what the importance was collected from
LM_HEAD_KEY = LM_HEAD[: -len(".weight")]
# 16 windows of 512 tokens: llama.cpp's imatrix examples use about 100 chunks of 512, but the mean squares
# stop moving from about 4096 tokens on (benchmarks/RESULTS.md, "Calibration"), and every token costs a forward
# pass of the whole checkpoint in fp32 on the build machine (about 2 x 3.6e9 FLOPs a token at Phi-4-mini).
TOKENS = 8192
WINDOW = 512
# Windows run through the model together: each group loads every layer once more (cheap beside the compute), and
# its activations (at Phi-4-mini's widths about 0.3 GB a window in the MLP and attention) are all that grows.
GROUP = 4
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_tensors() -> None:
    """Have glibc hand large freed blocks straight back: every layer's fp32 weights and activations are
    freed after it runs, and with glibc's adaptive threshold they stay in the heap, fragmenting it, so the
    process's resident size grows layer after layer. A fixed 1 MiB threshold mmaps each large block."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: its own allocator's behaviour
        pass


def collect(model_dir: str | Path, text_file: str | Path | None = None, tokens: int = TOKENS, window: int = WINDOW,
            progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """(importance: matrix name without .weight -> mean square of each input column, float32; what was run:
    source, tokens, windows, seconds)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    ids = calibration_ids(tokenizer, tokens, Path(text_file) if text_file is not None else None)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    window = min(window, int(config.max_position_embeddings))
    if len(ids) < 2:
        raise BuildError(f"the calibration text {text_file} gives {len(ids)} token(s): too little to calibrate on")
    width = min(window, len(ids))
    batch = torch.tensor([ids[i:i + width] for i in range(0, len(ids) - width + 1, width)])
    check_shapes(Weights(model_dir), config.to_dict())  # a wrong header is one line here, not torch's error
    model = load_reference(model_dir, layerwise=True)
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        total = x.square().sum(0, dtype=torch.float64)  # squares in fp32 (one temporary), their sum in fp64
        sums[name] = sums[name] + total if name in sums else total

    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _m, args, key=f"model.layers.{name}": add(key, args[0]))
    groups = [batch[i:i + GROUP] for i in range(0, batch.shape[0], GROUP)]
    layers = config.num_hidden_layers
    bar = progress.bar(layers * len(groups), "calibrate") if progress is not None else None
    if bar is not None:
        for layer in model.model.layers:
            layer.register_forward_hook(lambda *_: (bar.update(1), None)[1])  # a hook's return replaces the output
    try:
        return_freed_tensors()
        for group in groups:
            with torch.no_grad():
                hidden = model.model(input_ids=group).last_hidden_state  # the LM head's input; not its logits
            add(LM_HEAD_KEY, hidden)
            del hidden
    finally:
        if bar is not None:
            bar.close()
    count = batch.numel()
    importance = {name: (total / count).to(torch.float32).numpy() for name, total in sorted(sums.items())}
    run = {"source": Path(text_file).name if text_file is not None else "stdlib training split",
           "tokens": int(count), "windows": int(batch.shape[0]), "window": int(width),
           "seconds": round(time.perf_counter() - started, 1)}
    return importance, run


def save(path: Path, importance: dict[str, np.ndarray], run: dict) -> None:
    from safetensors.numpy import save_file

    # one metadata key: safetensors writes its metadata map in hash order, which would make two identical builds'
    # files (and bundles) differ
    described = {k: v for k, v in run.items() if k != "seconds"}
    save_file(importance, str(path), metadata={METADATA: json.dumps(described, sort_keys=True)})


def describe(path: Path) -> dict | None:
    """What a build folder's importance was collected from (the build record's "calibration"), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA, "{}"))
    return {"file": path.name, **{k: meta.get(k) for k in ("source", "tokens", "windows", "window")}}


def load(path: Path, model_dir: str | Path) -> dict[str, np.ndarray]:
    """A build's importance, checked against the checkpoint it must weight: one finite non-negative value per
    input column of every layer matrix and of the LM head."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ModelError(f"{path.parent} was built with calibrate, but its {path.name} is missing")
    try:
        importance = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from None
    weights = Weights(Path(model_dir))
    expected = {name[: -len(".weight")]: weights.rows(name).shape[1] for name in weights.names() if is_linear(name)}
    head = LM_HEAD if LM_HEAD in weights.names() else "model.embed_tokens.weight"
    expected[LM_HEAD_KEY] = weights.rows(head).shape[1]
    for name, columns in expected.items():
        values = importance.get(name)
        if values is None or values.shape != (columns,) or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ModelError(f"{path} has no valid importance for {name} ({columns} finite non-negative numbers)")
    return {name: importance[name] for name in expected}
