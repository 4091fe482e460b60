"""Runtime settings in genai_config.json that must fit the device, not the model's maximum."""

from __future__ import annotations

import json
from pathlib import Path

from phiedge.errors import BuildError

FILE = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"
# generation_config.json's sampling defaults that onnxruntime-genai's search options take, by the same name
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def read(model_dir: Path) -> dict:
    path = Path(model_dir) / FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path} is missing or not JSON: {exc}") from None


def write(model_dir: Path, config: dict) -> None:
    (Path(model_dir) / FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def apply_runtime(model_dir: Path, context_cap: int, threads: int) -> dict:
    """Cap the KV cache (search.max_length) and set the thread count; return what was written.

    The builder sets max_length to the model's context length (131072 for Phi-4-mini), and the KV
    cache is allocated for it; and without intra_op_num_threads ONNX Runtime GenAI ran on one thread
    of two here, at half speed.
    """
    config = read(model_dir)
    context_length = int(config["model"]["context_length"])
    max_length = min(context_cap, context_length)
    config.setdefault("search", {})["max_length"] = max_length
    session = config["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = threads
    write(model_dir, config)
    return {"max_length": max_length, "context_length": context_length, "intra_op_num_threads": threads}


def is_sampling_value(key: str, value) -> bool:
    """do_sample is a boolean; the others are numbers (a JSON true is not one)."""
    if key == "do_sample":
        return isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def generation_settings(checkpoint_dir: Path) -> dict:
    """What the checkpoint's generation_config.json says about stopping and sampling (read as JSON: nothing in
    a checkpoint is run); {} without one. A list eos_token_id is every token that ends generation."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path} holds no JSON object")
    eos = data.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else eos
    if eos is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool)
                                                                        for i in ids)):
        raise BuildError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}")
    found = {"eos_token_id": ids} if eos is not None else {}
    for key in ("bos_token_id", "pad_token_id"):
        if isinstance(data.get(key), int):
            found[key] = data[key]
    search = {k: data[k] for k in SAMPLING if k in data and is_sampling_value(k, data[k])}
    if search:
        found["search"] = search
    return found


def apply_generation(model_dir: Path, checkpoint_dir: Path) -> dict:
    """Stop tokens and sampling defaults from the checkpoint's generation_config.json, written into
    genai_config.json (the builder reads them too, but drops them silently on any error); return them."""
    settings = generation_settings(checkpoint_dir)
    if not settings:
        return {}
    config = read(model_dir)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if key in settings:
            config["model"][key] = settings[key]
    config.setdefault("search", {}).update(settings.get("search", {}))
    write(model_dir, config)
    return settings
