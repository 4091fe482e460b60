"""Local checkpoints shaped like a published Phi variant, with random weights.

No machine here can download weights, so phiedge is developed and tested on these. Unshrunk, a
synth checkpoint has the real shape, so speed and memory measured on it are the real ones; shrunk,
it keeps what the runtime is picky about: the head dimension and rotary settings (ONNX Runtime's
GroupQueryAttention needs rotary_dim/2 to be a multiple of 8), GQA, LongRoPE and tied embeddings.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

from phiedge import __version__, catalog
from phiedge.checkpoints.checkpoint import (
    SYNTH_FILE,
    head_dim,
    lm_head_collisions,
    parameter_shapes,
    weight_digests,
)
from phiedge.checkpoints.tokenizer import train_tokenizer
from phiedge.errors import ConfigError, ModelError
from phiedge.schema import ChatFormat, Variant
from phiedge.workspace import staged_dir

SHARD_BYTES = 2 * 1024**3
MAX_TOKENIZER_VOCAB = 32000  # BPE merges learnt from the stdlib; the embedding may be larger, as in real Phi
INIT_STD = 0.02


@dataclass(frozen=True)
class Shrink:
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int | None = None


def shaped_config(variant: Variant, shrink: Shrink) -> dict:
    """The variant's published config, shrunk where asked, head dimension kept."""
    cfg = json.loads(json.dumps(variant.config))
    problems = []
    hd = head_dim(cfg)
    heads0 = cfg["num_attention_heads"]
    kv0 = cfg.get("num_key_value_heads") or heads0
    heads = shrink.heads or heads0
    group = heads0 // kv0
    kv = shrink.kv_heads or (max(1, heads // group) if shrink.heads else kv0)
    for name, value in (("layers", shrink.layers), ("heads", shrink.heads), ("kv_heads", shrink.kv_heads),
                        ("intermediate", shrink.intermediate), ("vocab", shrink.vocab)):
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if heads % kv:
        problems.append(f"--heads {heads} is not a multiple of --kv-heads {kv}")
    if problems:
        raise ConfigError("synth", problems)
    cfg["num_attention_heads"] = heads
    cfg["num_key_value_heads"] = kv
    cfg["hidden_size"] = heads * hd
    if "head_dim" in cfg or cfg["hidden_size"] // heads != hd:
        cfg["head_dim"] = hd
    if shrink.layers:
        cfg["num_hidden_layers"] = shrink.layers
    if shrink.intermediate:
        cfg["intermediate_size"] = shrink.intermediate
    if shrink.vocab:
        cfg["vocab_size"] = shrink.vocab
    return cfg


def _tensor(name: str, shape: tuple[int, ...], seed: int):
    """One parameter, reproducible from (seed, name) alone, so weights can be written one at a time."""
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith("norm.weight") or "layernorm.weight" in name or name.endswith("ln.weight"):
        return 1.0 + INIT_STD * torch.randn(shape, generator=gen)
    return INIT_STD * torch.randn(shape, generator=gen)


def _write_weights(out: Path, config, seed: int, dtype: str, progress) -> int:
    """Write safetensors shards tensor by tensor; memory stays about one shard (Phi-4's 29 GB included)."""
    import math

    import torch
    from safetensors.torch import save_file

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    element = torch.tensor([], dtype=torch_dtype).element_size()
    shard_of, sizes = {}, [0]  # planned from the shapes alone, so each shard is written as soon as it is made
    for name, shape in parameter_shapes(config).items():
        nbytes = math.prod(shape) * element
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            sizes.append(0)
        shard_of[name] = (len(sizes) - 1, shape)
        sizes[-1] += nbytes
    names = [f"model-{i:05d}-of-{len(sizes):05d}.safetensors" for i in range(1, len(sizes) + 1)]
    if len(sizes) == 1:
        names = ["model.safetensors"]
    shard: dict = {}
    items = list(shard_of.items())
    for k, (name, (index, shape)) in enumerate(progress(items, "weights")):
        shard[name] = _tensor(name, shape, seed).to(torch_dtype)
        if k + 1 == len(items) or items[k + 1][1][0] != index:
            save_file(shard, out / names[index], metadata={"format": "pt"})
            shard.clear()
    if len(sizes) > 1:
        weight_map = {name: names[index] for name, (index, _) in shard_of.items()}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    return sum(sizes)


def _save_tokenizer(out: Path, fmt: ChatFormat, vocab_size: int, max_len: int) -> dict[str, int]:
    """Train a byte-level BPE on the stdlib, add the chat format's special tokens, save HF files."""
    from transformers import PreTrainedTokenizerFast

    n_bpe = min(vocab_size - len(fmt.special_tokens), MAX_TOKENIZER_VOCAB)
    if n_bpe < 300:
        raise ConfigError("synth", [f"--vocab {vocab_size} is too small: the byte-level tokenizer needs "
                                    f"{300 + len(fmt.special_tokens)} ids at least"])
    tok = train_tokenizer(n_bpe, fmt.special_tokens, fmt.text_tokens)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fmt.bos_token, eos_token=fmt.config_eos, pad_token=fmt.pad_token,
        unk_token=None, model_max_length=max_len, clean_up_tokenization_spaces=False)
    fast.chat_template = fmt.template
    fast.save_pretrained(out)
    # ONNX Runtime GenAI (ort-extensions) picks its BPE reader from tokenizer_class.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "GPT2Tokenizer"
    tok_cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return {t: tok.token_to_id(t) for t in fmt.special_tokens}


def synth(like: str, out: str | Path, shrink: Shrink = Shrink(), seed: int = 0, dtype: str = "bf16",
          force: bool = False, progress=None) -> dict:
    """Write a checkpoint folder shaped like `like`; return a summary of what was written."""
    from transformers import AutoConfig, GenerationConfig

    progress = progress or (lambda items, _label: items)
    variant = catalog.find_variant(like)
    if not variant.buildable:
        raise ModelError(f"{variant.name} cannot be built yet ({variant.reason}), so there is nothing to synthesize")
    if dtype not in ("bf16", "fp32", "fp16"):
        raise ConfigError("synth", [f"--dtype must be bf16, fp32 or fp16, not {dtype!r}"])
    fmt = catalog.chat_formats()[variant.chat_format]
    cfg = shaped_config(variant, shrink)
    collisions = lm_head_collisions(cfg)
    if collisions:
        raise ConfigError("synth", [f"--vocab {cfg['vocab_size']} equals the width of {', '.join(collisions)}; "
                                    "the model builder would take that layer for the LM head: pick another"])
    out = Path(out)
    with staged_dir(out, force=force) as tmp:
        ids = _save_tokenizer(tmp, fmt, cfg["vocab_size"], cfg["max_position_embeddings"])
        cfg["bos_token_id"] = ids[fmt.bos_token]
        cfg["eos_token_id"] = ids[fmt.config_eos]
        cfg["pad_token_id"] = ids[fmt.pad_token]
        arch = cfg.pop("architectures")
        config = AutoConfig.for_model(cfg.pop("model_type"), architectures=arch, **cfg)
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=ids[fmt.bos_token], eos_token_id=[ids[t] for t in fmt.eos_tokens],
                         pad_token_id=ids[fmt.pad_token]).save_pretrained(tmp)
        weight_bytes = _write_weights(tmp, config, seed, dtype, progress)
        params = sum(math.prod(s) for s in parameter_shapes(config).values())
        summary = {"like": variant.name, "seed": seed, "dtype": dtype, "params": params,
                   "weight_bytes": weight_bytes, "shrunk": {k: v for k, v in vars(shrink).items() if v},
                   "phiedge_version": __version__, "weights_sha256": weight_digests(tmp)}
        (tmp / SYNTH_FILE).write_text(json.dumps(summary, indent=2))
    return {"path": str(out), **summary}
