"""tokenizer.json for a checkpoint whose tokenizer is a GPT-2 style vocab.json and merges.txt.

onnxruntime-genai reads tokenizer.json. Where a checkpoint folder has none (Phi-4-mini's published folder as the
slow tokenizers save it: vocab.json, merges.txt, tokenizer_config.json), the builder has transformers convert it,
and that conversion splits text with GPT-2's regex: Phi-4-mini's published tokenizer.json splits with GPT-4o's
(digits in threes, case changes inside words), so the same text would get other ids than the model was trained on.
The chat format of the checkpoint's variant says which pattern its published tokenizer.json uses
(`split_pattern`); this puts it into the converted file the way the published one has it, a Split before a
ByteLevel that no longer applies GPT-2's regex.
"""

from __future__ import annotations

import json
from pathlib import Path

from phiedge import catalog
from phiedge.checkpoints.checkpoint import Checkpoint
from phiedge.errors import BuildError

FILE = "tokenizer.json"
VOCABULARY = ("vocab.json", "merges.txt")
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def split_pattern(checkpoint: Checkpoint) -> str | None:
    """The split regex of the published tokenizer of the checkpoint's variant, where the catalog has one."""
    if checkpoint.variant is None:
        return None
    fmt = catalog.find_variant(checkpoint.variant).chat_format
    return catalog.chat_formats()[fmt].split_pattern if fmt else None


def pre_tokenizer(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**GPT2_SPLIT, "use_regex": False}]}


def apply(model_dir: Path, checkpoint: Checkpoint) -> dict | None:
    """Give the converted tokenizer.json in model_dir the checkpoint's split pattern; say what was done, or None
    when the checkpoint brought its own tokenizer.json (or a sentencepiece model)."""
    source = checkpoint.path
    if (source / FILE).is_file() or not all((source / f).is_file() for f in VOCABULARY):
        return None
    path = Path(model_dir) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: the builder's tokenizer.json is missing or not JSON ({exc})") from None
    pattern = split_pattern(checkpoint)
    done = {"converted_from": list(VOCABULARY), "split_pattern": pattern,
            "split_from": f"chat format of {checkpoint.variant}" if pattern else "GPT-2's (transformers' conversion)"}
    if pattern is None:
        return done
    if data.get("pre_tokenizer") != GPT2_SPLIT:
        raise BuildError(f"{path}: expected transformers' GPT-2 byte-level pre-tokenizer to replace, found "
                         f"{json.dumps(data.get('pre_tokenizer'))[:200]}")
    data["pre_tokenizer"] = pre_tokenizer(pattern)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return done
