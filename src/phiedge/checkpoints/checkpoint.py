"""What is in a Hugging Face checkpoint folder, and whether phiedge can build it.

Every check here stands for a failure seen downstream, turned into one clear line before Olive
spends minutes on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from phiedge import catalog
from phiedge.artifacts import HubOrigin
from phiedge.checkpoints import hub
from phiedge.errors import ModelError, PhiedgeError
from phiedge.schema import Variant

SYNTH_FILE = "phiedge_synth.json"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
# A tokenizer is any one of these sets of files: what `tokenizers` saves, a sentencepiece model, or a GPT-2 style
# vocabulary and merges as the slow tokenizers save them (split as the variant's published tokenizer: tokenizer_files)
TOKENIZERS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    architecture: str
    variant: str | None  # catalog name when the shape is a published one (or synthesized from one)
    shrunk: bool
    notes: tuple[str, ...]
    origin: HubOrigin | None = None  # where it was fetched from, for a hub id (hub.py)

    @property
    def name(self) -> str:
        """What bundles are named after: the hub repository's name, else the folder's."""
        return self.origin.repo_id.split("/")[-1] if self.origin else self.path.name


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def kv_cache_bytes(layers: int, kv_heads: int, head_size: int, tokens: int, element_bytes: int) -> int:
    """The KV cache a runtime allocates: key and value, for every layer, KV head and position."""
    return 2 * layers * kv_heads * head_size * tokens * element_bytes


def linear_widths(config: dict) -> dict[str, int]:
    """Output widths of every Linear layer but the LM head, by name."""
    hd, heads = head_dim(config), config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if config.get("model_type") == "phi":
        return {"q_proj": heads * hd, "k_proj": kv * hd, "v_proj": kv * hd, "dense": config["hidden_size"],
                "fc1": config["intermediate_size"], "fc2": config["hidden_size"]}
    return {"qkv_proj": (heads + 2 * kv) * hd, "o_proj": config["hidden_size"],
            "gate_up_proj": 2 * config["intermediate_size"], "down_proj": config["hidden_size"]}


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape (tied LM head counted once), from a config object or dict, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        cfg = {k: v for k, v in config.items() if k not in ("auto_map", "_name_or_path")}
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def lm_head_collisions(config: dict) -> list[str]:
    """Layers the ONNX Runtime GenAI builder would mistake for the LM head.

    The builder (0.14.1) treats any Linear whose output width equals vocab_size as the LM head and
    wires the logits to it: the model loads and runs, with wrong logits. Real Phi shapes never
    collide; shrunk ones can.
    """
    return [name for name, width in linear_widths(config).items() if width == config["vocab_size"]]


def read_config(path: Path) -> dict:
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder (expected a Hugging Face checkpoint folder)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_file} does not hold a JSON object")
    return config


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, corrupt header), or None. Reads the header only."""
    import struct

    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                return f"{file.name}: header length {n} is beyond the file's {size} bytes (truncated or not safetensors)"
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return f"{file.name}: unreadable safetensors header (truncated or corrupt)"
    if not isinstance(header, dict):
        return f"{file.name}: safetensors header is not a JSON object"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need != size:
        return f"{file.name} is {size} bytes but its header describes {need} (truncated or corrupt)"
    return None


def missing_shards(path: Path) -> list[str]:
    """Weight files model.safetensors.index.json names that are not in the folder."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{index} is not a readable safetensors index") from None
    return [n for n in names if not (path / str(n)).is_file()]


def tokenizer_max_id(path: Path) -> int | None:
    """Largest token id of the tokenizer (vocabulary and added tokens) in tokenizer.json, or in vocab.json with the
    added tokens of tokenizer_config.json and added_tokens.json; None without either."""
    def ids_in(file: Path, read) -> list:
        try:
            return read(json.loads(file.read_text(encoding="utf-8"))) if file.is_file() else []
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise ModelError(f"{file} is not a readable {file.name}") from None

    if (path / "tokenizer.json").is_file():
        ids = ids_in(path / "tokenizer.json", lambda d: [*(d.get("model") or {}).get("vocab", {}).values(),
                                                         *(t["id"] for t in d.get("added_tokens") or [])])
    elif (path / "vocab.json").is_file():
        ids = [*ids_in(path / "vocab.json", lambda d: list(d.values())),
               *ids_in(path / "tokenizer_config.json", lambda d: [int(i) for i in d.get("added_tokens_decoder", {})]),
               *ids_in(path / "added_tokens.json", lambda d: list(d.values()))]
    else:
        return None
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) if ids else None


def match_variant(config: dict) -> list[Variant]:
    """Catalog variants whose published shape this config has (fine-tunes share a base's shape)."""
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings")

    def kv(cfg: dict) -> int:
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]

    return [v for v in catalog.variants().values()
            if v.buildable and all(v.config.get(k) == config.get(k) for k in keys) and kv(v.config) == kv(config)]


def weight_digests(path: Path) -> dict[str, str]:
    """SHA-256 of each weight file, by name: what phiedge_synth.json describes when synth or train writes it."""
    digests = {}
    for file in sorted(f for g in WEIGHT_GLOBS for f in Path(path).glob(g)):
        with open(file, "rb") as f:
            digests[file.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def synth_record(path: Path) -> dict | None:
    """phiedge's synth (or train) record, if the folder's weights are still the ones it was written for.

    The record switches off int4 thresholds (random weights), so it is trusted only with its weights: a
    synthesized folder fine-tuned elsewhere keeps the file but not the digests, and counts as real weights.
    """
    try:
        record = json.loads((Path(path) / SYNTH_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record.get("weights_sha256"):
        return None
    return record if record["weights_sha256"] == weight_digests(path) else None


def identify(path: Path, config: dict) -> tuple[Variant | None, bool]:
    """(variant, shrunk): from phiedge's synth record, the hub id the config names, or the shape."""
    synth = path / SYNTH_FILE
    if synth.is_file():
        try:
            like = catalog.find_variant(json.loads(synth.read_text())["like"])
            return like, not match_variant(config)
        except (KeyError, ValueError, OSError, PhiedgeError):
            pass
    matches = match_variant(config)
    named = str(config.get("_name_or_path", "")).lower()
    for v in matches:
        if named in {a.lower() for a in [v.hf_id, *v.aliases]}:
            return v, False
    return (min(matches, key=lambda v: len(v.name)), False) if matches else (None, False)


def check_config(path: Path, config: dict) -> str:
    """What config.json alone says against a build: an architecture phiedge cannot build, missing sizes, a layer
    the builder would take for the LM head. Returns the architecture."""
    arch = (config.get("architectures") or [None])[0]
    buildable, blocked = catalog.architectures()
    if arch in blocked:
        v = blocked[arch]
        raise ModelError(f"{path}: {arch} ({v.name}) cannot be built yet: {v.reason}")
    if arch not in buildable:
        raise ModelError(f"{path}: architecture {arch or '(none)'} is not a Phi model phiedge can build "
                         f"(supported: {', '.join(sorted(buildable))})")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size", "max_position_embeddings") if not isinstance(config.get(k), int)]
    if missing:
        raise ModelError(f"{path}/config.json lacks {', '.join(missing)}")
    collisions = lm_head_collisions(config)
    if collisions:
        raise ModelError(f"{path}: vocab_size {config['vocab_size']} equals the width of {', '.join(collisions)}; "
                         "the ONNX Runtime GenAI builder would take that layer for the LM head")
    return arch


def inspect(path: str | Path, origin: HubOrigin | None = None) -> Checkpoint:
    """Read and check a checkpoint folder; raise ModelError with one line on the first problem. `origin`: where
    it was fetched from, when that is not written in the folder (a snapshot in the Hugging Face cache)."""
    path = Path(path)
    config = read_config(path)
    arch = check_config(path, config)
    if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZERS):
        raise ModelError(f"{path} has no tokenizer ({' or '.join(' with '.join(files) for files in TOKENIZERS)})")
    missing = missing_shards(path)
    if missing:
        raise ModelError(f"{path}: model.safetensors.index.json names {len(missing)} shard(s) the folder lacks "
                         f"({', '.join(missing[:3])}): a download that did not finish? (phiedge fetch resumes it)")
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ModelError(f"{path}: {problem}")
    top = tokenizer_max_id(path)
    if top is not None and top >= config["vocab_size"]:
        raise ModelError(f"{path}: the tokenizer has token id {top}, beyond config.json's vocab_size "
                         f"{config['vocab_size']} (tokenizer and weights are from different models?)")
    if arch == "Phi3ForCausalLM" and not config.get("rope_scaling") and \
            config["max_position_embeddings"] != config.get("original_max_position_embeddings", 4096):
        raise ModelError(f"{path}/config.json: max_position_embeddings {config['max_position_embeddings']} differs "
                         f"from original_max_position_embeddings {config.get('original_max_position_embeddings', '(absent: 4096)')} "
                         "without LongRoPE rope_scaling; the model builder would take the LongRoPE path and fail")
    notes = []
    if config.get("auto_map"):
        notes.append("config.json names custom code (auto_map); phiedge uses transformers' built-in "
                     f"{arch} instead and never runs remote code")
    variant, shrunk = identify(path, config)
    return Checkpoint(path=path.resolve(), config=config, architecture=arch,
                      variant=variant.name if variant else None, shrunk=shrunk, notes=tuple(notes),
                      origin=origin or hub.origin(path))
