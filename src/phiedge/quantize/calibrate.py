"""Calibration (`--calibrate`): the second moments of every Linear's inputs over calibration text.

A weight's error reaches a layer's output multiplied by its input: with inputs x, the output error of a row
is sum_j dw_j x_j, whose expected square is (to first order, inputs uncorrelated) sum_j dw_j^2 E[x_j^2]. So
columns whose inputs are large deserve a closer fit. llama.cpp's `llama-imatrix` collects exactly these mean
squares (its importance matrix) and its quantizers weight their scale search by them; AWQ starts from the
same observation. phiedge collects them from the checkpoint itself, in fp32, with transformers' own modules:
the checkpoint runs over the calibration text one decoder layer at a time (`Calibration`: all windows
through layer 0, then through layer 1, ...; only the embedding table, one layer and the windows' hidden states
are in memory), a forward pre-hook on every Linear adds up x^2 per input column, and the final norm's output
gives the LM head's. The mse search (quantizer.search_weights) multiplies its per-weight weights by them.
GPTQ (gptq.py) needs the whole matrix E[x x^T] of each Linear: the same pass gives it layer by layer, and the
quantizer uses each layer's before the next is computed (prequant.write), so they are never all in memory
(at Phi-4-mini's widths they are 0.38 GB a layer).

The diagonals are a few MB (one float per input column of every matrix), written into the build folder as
IMPORTANCE, the record of what the build was calibrated on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from phiedge.checkpoints import tokenizer_files
from phiedge.checkpoints.corpus import calibration_ids
from phiedge.checkpoints.fp32 import load_reference
from phiedge.checkpoints.weights import Weights
from phiedge.errors import BuildError
from phiedge.quantize.prequant import LM_HEAD_KEY, check_shapes
from phiedge.quantize.split_table import ROW_PROBABILITY

IMPORTANCE = "phiedge_importance.safetensors"
METADATA = "phiedge_calibration"  # the safetensors metadata key holding what the importance was collected from
# 8 windows of 512 tokens: llama.cpp's imatrix examples use about 100 chunks of 512, but the mean squares stop
# moving from about 4096 tokens on, and GPTQ built from 4096 tokens was as close to the original as from 8192 or
# 16384 (benchmarks/RESULTS.md, "Calibration", "GPTQ"); every token costs a forward pass of the whole checkpoint
# in fp32 on the build machine (about 2 x 3.6e9 FLOPs a token at Phi-4-mini) and its share of GPTQ's statistics.
TOKENS = 4096
HEAD_ROWS = 256  # positions whose logits are computed at once: 205 MB of fp32 at a 200064 vocabulary
WINDOW = 512
# Windows run through a layer together: each group loads the layer once more (cheap beside the compute), and its
# activations (at Phi-4-mini's widths about 0.3 GB a window in the MLP and attention) are all that grows.
GROUP = 4
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # glibc's mallopt parameters
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 64 << 20


def return_freed_tensors() -> None:
    """Have glibc hand large freed blocks straight back: every layer's fp32 weights and activations are
    freed after it runs, and with glibc's adaptive threshold they stay in the heap, fragmenting it, so the
    process's resident size grows layer after layer. A fixed threshold of 32 MiB (glibc's largest adaptive one)
    mmaps the layers' weights, activations and H matrices, which go back to the system when freed; smaller
    blocks (GPTQ's and the mse search's working arrays) stay in the heap, with 64 MiB of free heap top kept
    rather than trimmed. A 1 MiB threshold, tried first, mmapped those working arrays too: a page fault for
    every 4 KiB of every temporary, the four-layer real-width GPTQ build 202 s (78 s system CPU) instead of
    166 s (39 s), for 0.33 GB less peak (benchmarks/RESULTS.md, "GPTQ")."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator's behaviour
        pass


class Calibration:
    """The checkpoint over the calibration text in fp32, one decoder layer at a time: every window's hidden
    states (tokens x hidden in fp32: 50 MB at Phi-4-mini's widths) go through layer 0, then all of them through
    layer 1, and so on, so that each layer's input statistics are complete when it is done and the next layer
    has not been loaded. `layers()` yields them; `importance` and `run` are filled as it goes."""

    def __init__(self, model_dir: str | Path, text_file: str | Path | None = None, tokens: int = TOKENS,
                 window: int = WINDOW, progress=None, row_probability: bool = False):
        import torch
        from transformers import AutoConfig

        self.started = time.perf_counter()
        self.model_dir = Path(model_dir)
        text = Path(text_file) if text_file is not None else None
        ids = calibration_ids(tokenizer_files.load(self.model_dir), tokens, text)
        self.config = AutoConfig.from_pretrained(str(self.model_dir), trust_remote_code=False)
        window = min(window, int(self.config.max_position_embeddings))
        if len(ids) < 2:
            raise BuildError(f"the calibration text {text_file} gives {len(ids)} token(s): too little to calibrate on")
        width = min(window, len(ids))
        self.batch = torch.tensor([ids[i:i + width] for i in range(0, len(ids) - width + 1, width)])
        check_shapes(Weights(self.model_dir), self.config.to_dict())  # a wrong header: one line, not torch's error
        self.progress = progress
        self.row_probability = row_probability
        self.importance: dict[str, np.ndarray] = {}
        self.run = {"source": Path(text_file).name if text_file is not None else "stdlib training split",
                    "tokens": int(self.batch.numel()), "windows": int(self.batch.shape[0]), "window": int(width)}

    def layers(self, full: bool = False):
        """Yield (layer index, {matrix name: its inputs' second moments}) in layer order: with `full` the
        [K, K] matrices E[x x^T] (torch float32, GPTQ's), then ("lm_head", {"lm_head": the LM head's}), else
        only the layers' diagonals. Afterwards `importance`
        holds every diagonal (numpy float32), the LM head's ("lm_head") from the final norm's output, and with
        `row_probability` the probability the checkpoint gives each token, averaged over the calibration's
        positions (ROW_PROBABILITY: one number per LM head row, which ranks the table's rows for
        prequant's eight_bit_rows)."""
        import torch
        from transformers.masking_utils import create_causal_mask

        model = load_reference(self.model_dir, layerwise=True)
        inner = model.model
        count = self.batch.numel()
        groups = [self.batch[i:i + GROUP] for i in range(0, self.batch.shape[0], GROUP)]
        bar = self.progress.bar(len(inner.layers), "calibrate") if self.progress is not None else None
        return_freed_tensors()
        try:
            with torch.no_grad():
                hidden = [inner.embed_tokens(g) for g in groups]
                position_ids = torch.arange(self.batch.shape[1])[None]
                sums: dict[str, torch.Tensor] = {}  # one layer's

                def add(name: str, x) -> None:
                    x = x.detach().reshape(-1, x.shape[-1])
                    if full:
                        total = x.T @ x  # float32 products, one [K, K] sum per group of windows
                    else:
                        total = x.square().sum(0, dtype=torch.float64)
                    sums[name] = sums[name] + total if name in sums else total

                for index, layer in enumerate(inner.layers):
                    hooks = [module.register_forward_pre_hook(
                        lambda _m, args, key=f"model.layers.{index}.{name}": add(key, args[0]))
                        for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
                    for g, states in enumerate(hidden):
                        # what Phi3Model.forward passes each layer (no cache, no padding)
                        cache_position = position_ids[0]
                        mask = create_causal_mask(config=self.config, input_embeds=states, attention_mask=None,
                                                  cache_position=cache_position, past_key_values=None,
                                                  position_ids=position_ids)
                        hidden[g] = layer(states, attention_mask=mask, position_ids=position_ids,
                                          cache_position=cache_position,
                                          position_embeddings=inner.rotary_emb(states, position_ids))
                    for hook in hooks:
                        hook.remove()
                    stats = {name: total / count for name, total in sorted(sums.items())}
                    for name, value in stats.items():
                        diagonal = torch.diagonal(value) if full else value
                        self.importance[name] = diagonal.to(torch.float32).numpy().copy()
                    sums.clear()
                    if bar is not None:
                        bar.update(1)
                    yield index, (stats if full else {k: self.importance[k] for k in stats})
                    del stats
                normed = [inner.norm(states).reshape(-1, states.shape[-1]) for states in hidden]
                del hidden
                head = sum(x.square().sum(0, dtype=torch.float64) for x in normed)
                self.importance[LM_HEAD_KEY] = (head / count).to(torch.float32).numpy()
                if self.row_probability:
                    table = model.get_output_embeddings().weight
                    total = torch.zeros(table.shape[0], dtype=torch.float64)
                    for x in normed:
                        for start in range(0, x.shape[0], HEAD_ROWS):
                            total += torch.softmax(x[start:start + HEAD_ROWS] @ table.T, -1).sum(0, dtype=torch.float64)
                    self.importance[ROW_PROBABILITY] = (total / count).to(torch.float32).numpy()
                if full:  # the LM head's E[x x^T] last, for a split table's GPTQ
                    yield LM_HEAD_KEY, {LM_HEAD_KEY: sum(x.T @ x for x in normed) / count}
        finally:
            if bar is not None:
                bar.close()
        self.run["seconds"] = round(time.perf_counter() - self.started, 1)


def collect(model_dir: str | Path, text_file: str | Path | None = None, tokens: int = TOKENS, window: int = WINDOW,
            progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """(importance: matrix name without .weight -> mean square of each input column, float32; what was run:
    source, tokens, windows, seconds)."""
    calibration = Calibration(model_dir, text_file, tokens, window, progress)
    for _ in calibration.layers():
        pass
    return dict(sorted(calibration.importance.items())), calibration.run


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
