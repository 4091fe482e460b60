"""Quantize a checkpoint one matrix at a time, for builds whose memory must not grow with the model.

Olive's ModelBuilder pass reads Olive-format quantized checkpoints (`quant_method: olive`) without loading a
float model: their weights go into MatMulNBits (and an int8/int4 embedding table into GatherBlockQuantized)
as they are. This module writes such a checkpoint. Every Linear weight, the LM head and, if the target asks,
the embedding table are read from the safetensors files a slice of rows at a time, quantized by
`quantizer.quantize` (rtn: ONNX Runtime's own block quantization kernel, the one the builder's default int4
path runs on its fp32 graph, so the weights come out identical; mse: least-squared-error block scales in
the same layout) or, for the layers' matrices, `gptq.quantize` (one whole matrix in fp32 with its inputs'
second moments), and written shard by shard. Peak memory is one shard of quantized weights plus one matrix
in fp32, whatever the model's size.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np

from phiedge.checkpoints.checkpoint import parameter_shapes
from phiedge.checkpoints.weights import Weights
from phiedge.errors import BuildError, ModelError
from phiedge.quantize import gptq, split_table
from phiedge.quantize.quantizer import digest, quantize

SHARD_BYTES = 1 << 30  # quantized bytes per output safetensors file
EMBEDDING = "model.embed_tokens.weight"
EMBEDDING_BITS = {"int8": 8, "int4": 4}
SHARED = "shared"  # embeddings setting: the table is the LM head's quantized matrix (tied checkpoints)
LM_HEAD = "lm_head.weight"
LM_HEAD_KEY = "lm_head"  # the LM head as a matrix name (importance, second moments)
# The builder's quantized-checkpoint reader knows Phi-3-style names (fused qkv_proj and gate_up_proj, model.norm),
# not Phi-2's (dense, fc1, fc2, final_layernorm): Phi-2 goes through the builder's own quantization.
ARCHITECTURES = ("Phi3ForCausalLM",)
# Left behind: the float weights (re-written quantized), and a checkpoint's own Python code (auto_map's modeling_*.py),
# which phiedge never runs and so never hands to the builder; auto_map is dropped from the configs written here.
NOT_COPIED = (".safetensors", ".safetensors.index.json", ".bin", ".py")
TOKENIZER_CONFIG = "tokenizer_config.json"
LINEAR_SUFFIXES = (".qkv_proj.weight", ".o_proj.weight", ".gate_up_proj.weight", ".down_proj.weight",
                   ".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight")


def streamable(config: dict) -> bool:
    """Whether the builder reads this architecture's quantized checkpoints (what method stream writes)."""
    return (config.get("architectures") or ["?"])[0] in ARCHITECTURES


def unsupported(config: dict, folder: Path) -> str | None:
    """Why this checkpoint cannot be quantized matrix by matrix, or None."""
    arch = (config.get("architectures") or ["?"])[0]
    if not streamable(config):
        return f"{arch} is not read by the builder's quantized-checkpoint path (Phi-3 family only)"
    if "quantization_config" in config:
        return "the checkpoint is already quantized"
    if not any(Path(folder).glob("*.safetensors")):
        return "its weights are not in safetensors files"
    return None


def release_memory() -> None:
    """Hand freed heap back to the system (glibc keeps it: 2.6 GB after a full Phi-4-mini, 0.4 GB trimmed),
    so the builder's process does not run beside a parent that looks 2 GB bigger than it is."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        pass


def input_widths(config: dict) -> list[int]:
    """The distinct input widths (K) of the matrices an int4 build quantizes (every 2-D weight of the layers,
    the table and the LM head), which its block size must divide: phiedge's quantizer and Olive's quantizing
    passes require it, and the builder's own pads the last block."""
    shapes = parameter_shapes(config)
    return sorted({shape[1] for name, shape in shapes.items()
                   if len(shape) == 2 and (name.startswith("model.layers.") or name in (EMBEDDING, LM_HEAD))})


def check_shapes(weights: Weights, config: dict) -> None:
    """Every tensor the config implies, at the shape it implies: a wrong header would otherwise be quantized
    into a model that only fails when it is loaded."""
    for name, shape in parameter_shapes(config).items():
        if name not in weights.tensors:
            raise ModelError(f"the checkpoint lacks {name}, which the config implies")
        found = list(weights.rows(name).shape)
        if found != list(shape):
            raise ModelError(f"{name} is {found} in the checkpoint, but the config makes it {list(shape)}")


def is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(LINEAR_SUFFIXES)


def eight_bit_matrices(names, patterns) -> tuple[set[str], list[str]]:
    """The layer matrices (names without .weight) that `patterns` keep at 8 bits, and the patterns that match
    none (a typo would otherwise quietly leave every matrix at 4 bits)."""
    matrices = [name[: -len(".weight")] for name in names if is_linear(name)]
    chosen = {m for m in matrices if any(fnmatch.fnmatchcase(m, p) for p in patterns)}
    return chosen, [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in matrices)]


def count_matrices(model_dir: Path, embeddings: str = "float") -> int:
    """Matrices `write` quantizes: the layers' Linear weights, the LM head and perhaps the embedding table."""
    return sum(map(is_linear, Weights(model_dir).names())) + 1 + (embeddings in EMBEDDING_BITS)


def layer_index(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def write(model_dir: Path, out: Path, block_size: int, symmetric: bool, lm_head_bits: int = 4,
          embeddings: str = "float", on_matrix=None, quantizer: str = "rtn", eight_bit=(),
          importance: dict | None = None, second_moments=None, eight_bit_rows: float = 0.0,
          split_file: Path | None = None) -> tuple[dict, dict[str, str]]:
    """Write an Olive-format quantized checkpoint of `model_dir` into `out` (a new folder).

    Linear weights become qweight/scales (+qzeros when asymmetric) at 4 bits, the LM head at `lm_head_bits`
    (quantized from the embedding when the checkpoint ties them), the embedding table at 8 or 4 bits or as
    it is (`embeddings`: int8, int4, float), or, for a tied checkpoint, once for both (`shared`: the table
    at `lm_head_bits`, which Olive's loader hands to the builder as both the table and the LM head; the
    builder still writes it twice, and graph_fixes.share_tied_table keeps one); the layer matrices
    `eight_bit` patterns name at 8 bits. `quantizer` rounds them: rtn or mse for every matrix, the mse search
    weighted by `importance` (calibrate's: matrix name -> input columns' mean squares; the LM head's,
    "lm_head", also weights a shared table; a table of its own has none); gptq for the layers' matrices, from
    `second_moments` (calibrate.Calibration.layers(full=True): one layer's matrices at a time, consumed in
    layer order, so the layers are quantized as the calibration reaches them), the LM head and table by mse.
    `eight_bit_rows` (a shared 4-bit table): that share of the table's rows, ranked by the calibration's
    ROW_PROBABILITY, at 8 bits and the rest at 4, written to `split_file` (split_table) for the graph, which
    takes it instead of the builder's table; the digests then name the parts, not the table.
    Norms are copied. Returns the quantization_config written into config.json, which tells Olive's
    ModelBuilder pass what it reads, and each quantized matrix's `digest` (name without .weight).
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    weights = Weights(model_dir)
    check_shapes(weights, config)
    shared = embeddings == SHARED
    if shared and not config.get("tie_word_embeddings"):
        raise BuildError("embeddings shared needs a checkpoint whose LM head is its embedding table "
                         "(tie_word_embeddings)")
    if eight_bit_rows and (not shared or lm_head_bits != 4 or not symmetric or split_file is None):
        raise BuildError("eight_bit_rows splits a shared symmetric 4-bit table into a file of its own")
    if (quantizer == "gptq") != (second_moments is not None):
        raise BuildError("quantizer gptq needs the calibration's second moments, and only gptq reads them")
    out.mkdir(parents=True)
    for path in model_dir.iterdir():  # tokenizer, chat template, generation config: as they are
        if path.is_file() and not path.name.endswith(NOT_COPIED) and path.name not in ("config.json", TOKENIZER_CONFIG):
            shutil.copy2(path, out / path.name)
    if (model_dir / TOKENIZER_CONFIG).is_file():
        try:
            tokenizer_config = dict(json.loads((model_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise ModelError(f"{model_dir / TOKENIZER_CONFIG} is not a readable JSON object: {exc}") from None
        tokenizer_config.pop("auto_map", None)
        (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                                            encoding="utf-8")
    names = weights.names()
    at_eight, unmatched = eight_bit_matrices(names, eight_bit)
    if unmatched:
        raise ModelError(f"eight_bit pattern(s) {', '.join(unmatched)} match no layer matrix of the checkpoint")
    shard: dict[str, torch.Tensor] = {}
    written = {"bytes": 0, "files": 0}  # of the shard being filled; shards written so far
    digests: dict[str, str] = {}

    def flush() -> None:
        if shard:
            save_file(shard, str(out / f"model-{written['files']:05d}.safetensors"), metadata={"format": "pt"})
            shard.clear()
            written["bytes"], written["files"] = 0, written["files"] + 1

    def put(name: str, tensor) -> None:
        shard[name] = torch.from_numpy(tensor) if isinstance(tensor, np.ndarray) else tensor.contiguous()
        written["bytes"] += shard[name].numel() * shard[name].element_size()
        if written["bytes"] >= SHARD_BYTES:
            flush()

    def quantized(prefix: str, source: str, bits: int, moments=None) -> None:
        if moments is not None:
            packed, scales, zeros = gptq.quantize(weights.tensor(source).to(torch.float32).numpy(), moments, bits,
                                                block_size, symmetric)
        else:
            key = LM_HEAD_KEY if prefix == "model.embed_tokens" and shared else prefix
            method = "mse" if quantizer == "gptq" else quantizer
            packed, scales, zeros = quantize(weights.rows(source), bits, block_size, symmetric, method,
                                             (importance or {}).get(key))
        put(f"{prefix}.qweight", packed)
        put(f"{prefix}.scales", scales)
        if not symmetric:
            put(f"{prefix}.qzeros", zeros)
        digests[prefix] = digest(packed, scales, zeros)
        if on_matrix:
            on_matrix(prefix)

    layers: dict[int, list[str]] = {}
    for name in names:
        if layer_index(name) is not None:
            layers.setdefault(layer_index(name), []).append(name)
        elif name not in (LM_HEAD, EMBEDDING):
            put(name, weights.tensor(name))  # norms
    stream = iter(second_moments) if second_moments is not None else None
    for index in sorted(layers):
        moments = None
        if stream is not None:
            got, moments = next(stream, (None, None))
            if got != index:
                raise BuildError(f"the calibration gave layer {got} where layer {index} was due")
        for name in layers[index]:
            if is_linear(name):
                matrix = name[: -len(".weight")]
                quantized(matrix, name, 8 if matrix in at_eight else 4, None if moments is None else moments[matrix])
            else:
                put(name, weights.tensor(name))
        del moments
    head_moments = None
    if stream is not None:
        for got, moments in stream:  # the calibration's end: the LM head's importance and second moments
            head_moments = moments.get(LM_HEAD_KEY) if got == LM_HEAD_KEY else head_moments
    # the table and the LM head last: a calibration run with the layers gives the LM head's importance at its end
    if EMBEDDING in names and embeddings in EMBEDDING_BITS:
        quantized("model.embed_tokens", EMBEDDING, EMBEDDING_BITS[embeddings])
    elif EMBEDDING in names and shared:
        quantized("model.embed_tokens", EMBEDDING, lm_head_bits)
        if eight_bit_rows:
            probability = (importance or {}).get(split_table.ROW_PROBABILITY)
            if probability is None:
                raise BuildError("eight_bit_rows ranks the table's rows by the calibration's output probabilities, "
                                 "which this build did not collect")
            parts = split_table.quantize_split(weights.rows(EMBEDDING), split_table.hot_rows(probability,
                                               eight_bit_rows), block_size, (importance or {}).get(LM_HEAD_KEY),
                                               cold_moments=head_moments)
            split_table.save(split_file, parts)
            del digests["model.embed_tokens"]  # the graph keeps the parts, not the builder's table
            digests.update(split_table.digests(parts))
    elif EMBEDDING in names:
        put(EMBEDDING, weights.tensor(EMBEDDING))
    if not shared:
        quantized("lm_head", LM_HEAD if LM_HEAD in names else EMBEDDING, lm_head_bits)
    flush()
    overrides = {matrix: {"bits": 8} for matrix in sorted(at_eight)}
    if lm_head_bits != 4:
        overrides["model.embed_tokens" if shared else "lm_head"] = {"bits": lm_head_bits}
    if embeddings == "int8":
        overrides["model.embed_tokens"] = {"bits": 8}
    # Olive's loader (which its ModelBuilder pass patches into the builder) reads these keys. Unshared, the
    # LM head is written apart from the table even when the checkpoint ties them, since their precisions may
    # differ; shared, the loader's tie_word_embeddings makes its LM head the table's module
    quant = {"quant_method": "olive", "bits": 4, "symmetric": symmetric, "group_size": block_size,
             "lm_head": True, "embeds": embeddings != "float", "tie_word_embeddings": shared,
             "modules_to_not_convert": None, "overrides": overrides or None}
    config.pop("auto_map", None)
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2))
    return quant, digests
