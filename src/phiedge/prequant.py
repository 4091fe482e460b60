"""Quantize a checkpoint one matrix at a time, for builds whose memory must not grow with the model.

Olive's ModelBuilder pass reads Olive-format quantized checkpoints (`quant_method: olive`) without loading a
float model: their weights go into MatMulNBits (and an int8/int4 embedding table into GatherBlockQuantized)
as they are. This module writes such a checkpoint. Every Linear weight, the LM head and, if the target asks,
the embedding table are read from the safetensors files a slice of rows at a time, quantized by ONNX
Runtime's own block quantization kernel (`quantize_matmul_4bits`/`_8bits`, the one the builder's default
int4 path runs on its fp32 graph, so the weights come out identical), and written shard by shard.
Peak memory is one shard of quantized weights plus one slice in fp32, whatever the model's size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import BuildError, ModelError

ROWS_PER_CHUNK = 4096  # rows quantized at once: Phi-4's 17920-wide down_proj is 294 MB of fp32 (twice, transposed)
SHARD_BYTES = 1 << 30  # quantized bytes per output safetensors file
EMBEDDING = "model.embed_tokens.weight"
EMBEDDING_BITS = {"int8": 8, "int4": 4}
SHARED = "shared"  # embeddings setting: the table is the LM head's quantized matrix (tied checkpoints)
LM_HEAD = "lm_head.weight"
# The builder's quantized-checkpoint reader knows Phi-3-style names (fused qkv_proj and gate_up_proj, model.norm),
# not Phi-2's (dense, fc1, fc2, final_layernorm): Phi-2 goes through the builder's own quantization.
ARCHITECTURES = ("Phi3ForCausalLM",)
LINEAR_SUFFIXES = (".qkv_proj.weight", ".o_proj.weight", ".gate_up_proj.weight", ".down_proj.weight",
                   ".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight")


def unsupported(config: dict, folder: Path) -> str | None:
    """Why this checkpoint cannot be quantized matrix by matrix, or None."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        return f"{arch} is not read by the builder's quantized-checkpoint path (Phi-3 family only)"
    if "quantization_config" in config:
        return "the checkpoint is already quantized"
    if not any(Path(folder).glob("*.safetensors")):
        return "its weights are not in safetensors files"
    return None


def quantize_rows(weight, bits: int, block_size: int, symmetric: bool, rows: int = ROWS_PER_CHUNK):
    """ONNX Runtime's block quantization of a [N, K] weight (a Linear's layout; blocks run along K).

    Returns (packed [N, K*bits/8] uint8, scales [N, K/block] float32, zero points [N, ceil(blocks*bits/8)]
    uint8): the MatMulNBits layout, which is also GatherBlockQuantized's for a [vocab, hidden] table.
    `weight` may be any tensor or array slicable by rows (a memory-mapped safetensors slice); it is read
    `rows` rows at a time, so only one chunk is ever in fp32.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    n, k = weight.shape
    if k % block_size:
        raise BuildError(f"a {n} x {k} weight does not split into blocks of {block_size}")
    blocks, blob = k // block_size, block_size * bits // 8
    packed = np.empty((n, blocks * blob), dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float32)
    zero_points = np.empty((n, (blocks * bits + 7) // 8), dtype=np.uint8)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = _fp32(weight[start:stop])
        fp32 = np.ascontiguousarray(chunk.T)  # the kernel takes B of MatMul(A, B): [K, N]
        del chunk
        cols = stop - start
        p = np.zeros((cols, blocks, blob), dtype=np.uint8)
        s = np.zeros((cols, blocks), dtype=np.float32)
        z = np.zeros((cols, zero_points.shape[1]), dtype=np.uint8)
        kernel(p, fp32, s, z, block_size, cols, k, symmetric)
        packed[start:stop], scales[start:stop], zero_points[start:stop] = p.reshape(cols, -1), s, z
    return packed, scales, zero_points


def _fp32(tensor) -> np.ndarray:
    import torch

    if isinstance(tensor, torch.Tensor):
        return tensor.to(torch.float32).numpy()
    return np.asarray(tensor, dtype=np.float32)


class Rows:
    """One tensor of a safetensors file, read a slice of rows at a time.

    The file is opened (memory-mapped) for each read and closed after it, so the pages read do not stay
    mapped: resident memory holds the rows being quantized, not the checkpoint.
    """

    def __init__(self, path: Path, name: str, shape: list[int]):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def __getitem__(self, rows: slice):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.name)[rows].clone()

    def read(self):
        return self[0: self.shape[0]] if self.shape else self[...]


class Weights:
    """Where each tensor of a checkpoint's safetensors files is, by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.tensors: dict[str, Rows] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self.tensors[name] = Rows(path, name, f.get_slice(name).get_shape())

    def names(self) -> list[str]:
        return list(self.tensors)

    def rows(self, name: str) -> Rows:
        return self.tensors[name]

    def tensor(self, name: str):
        return self.tensors[name].read()


def release_memory() -> None:
    """Hand freed heap back to the system (glibc keeps it: 2.6 GB after a full Phi-4-mini, 0.4 GB trimmed),
    so the builder's process does not run beside a parent that looks 2 GB bigger than it is."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        pass


def check_shapes(weights: Weights, config: dict) -> None:
    """Every tensor the config implies, at the shape it implies: a wrong header would otherwise be quantized
    into a model that only fails when it is loaded."""
    from .checkpoint import parameter_shapes

    for name, shape in parameter_shapes(config).items():
        if name not in weights.tensors:
            raise ModelError(f"the checkpoint lacks {name}, which the config implies")
        found = list(weights.rows(name).shape)
        if found != list(shape):
            raise ModelError(f"{name} is {found} in the checkpoint, but the config makes it {list(shape)}")


def is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(LINEAR_SUFFIXES)


def count_matrices(model_dir: Path, embeddings: str = "float") -> int:
    """Matrices `write` quantizes: the layers' Linear weights, the LM head and perhaps the embedding table."""
    return sum(map(is_linear, Weights(model_dir).names())) + 1 + (embeddings in EMBEDDING_BITS)


def write(model_dir: Path, out: Path, block_size: int, symmetric: bool, lm_head_bits: int = 4,
          embeddings: str = "float", on_matrix=None) -> dict:
    """Write an Olive-format quantized checkpoint of `model_dir` into `out` (a new folder).

    Linear weights become qweight/scales (+qzeros when asymmetric) at 4 bits, the LM head at `lm_head_bits`
    (quantized from the embedding when the checkpoint ties them), the embedding table at 8 or 4 bits or as
    it is (`embeddings`: int8, int4, float), or, for a tied checkpoint, once for both (`shared`: the table
    at `lm_head_bits`, which Olive's loader hands to the builder as both the table and the LM head; the
    builder still writes it twice, and graph_fixes.share_tied_table keeps one). Norms are copied. Returns
    the quantization_config written into config.json, which tells Olive's ModelBuilder pass what it reads.
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
    out.mkdir(parents=True)
    for path in model_dir.iterdir():  # tokenizer, chat template, generation config: as they are
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json", ".bin")) \
                and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    names = weights.names()
    shard: dict[str, torch.Tensor] = {}
    written = {"bytes": 0, "files": 0}  # of the shard being filled; shards written so far

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

    def quantized(prefix: str, source: str, bits: int) -> None:
        packed, scales, zeros = quantize_rows(weights.rows(source), bits, block_size, symmetric)
        put(f"{prefix}.qweight", packed)
        put(f"{prefix}.scales", scales)
        if not symmetric:
            put(f"{prefix}.qzeros", zeros)
        if on_matrix:
            on_matrix(prefix)

    for name in names:
        if name == LM_HEAD:
            continue
        if name == EMBEDDING and embeddings in EMBEDDING_BITS:
            quantized("model.embed_tokens", name, EMBEDDING_BITS[embeddings])
        elif name == EMBEDDING and shared:
            quantized("model.embed_tokens", name, lm_head_bits)
        elif is_linear(name):
            quantized(name[: -len(".weight")], name, 4)
        else:
            put(name, weights.tensor(name))
    if not shared:
        quantized("lm_head", LM_HEAD if LM_HEAD in names else EMBEDDING, lm_head_bits)
    flush()
    overrides = {}
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
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2))
    return quant
