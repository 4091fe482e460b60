"""Runtime settings in genai_config.json that must fit the device, not the model's maximum."""

from __future__ import annotations

import json
from pathlib import Path

from phiedge.errors import BuildError

FILE = "genai_config.json"


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
