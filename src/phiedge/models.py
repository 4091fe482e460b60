"""The catalog as a user sees it: a table of variants, and a pick for a device and a task."""

from __future__ import annotations

import re

from phiedge import catalog
from phiedge.checkpoints.checkpoint import head_dim, kv_cache_bytes
from phiedge.errors import ConfigError
from phiedge.quantize.prequant import EMBEDDING_BITS, SHARED, streamable
from phiedge.schema import Variant

GB = 1024**3
RUNTIME_OVERHEAD = 0.35 * GB  # ONNX Runtime, tokenizer and activations, measured order of magnitude
RAM_SHARE = 0.7  # what an app may take of a device's memory next to the OS and other apps
CONTEXTS = (4096, 2048, 1024)  # context caps tried, longest first


def parse_size(text: str) -> int:
    """'4GB', '4 GiB', '512MB' or a bare number of GB -> bytes (1 GB taken as 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise ConfigError("--ram", [f"cannot read {text!r} as a size (e.g. 4GB, 512MB)"])
    unit = (m.group(2) or "g")[0]
    return int(float(m.group(1)) * 1024 ** "kmgt".index(unit) * 1024)


def int4_footprint(v: Variant, context: int = CONTEXTS[0], target: str = "cpu") -> dict[str, int]:
    """Bytes at run time for an int4 build with the target's int4 settings (the cpu target's by default).

    Every matrix at 4 bits plus an fp32 scale (and with asymmetric blocks a 4-bit zero point) per block; the
    LM head at lm_head_bits; the table as method stream writes it (one shared table at lm_head_bits for a tied
    checkpoint with embeddings shared, else int8/int4 or fp32) where the architecture streams, the builder's
    fp32 table where it does not (Phi-2). Matrices eight_bit raises are left at 4 bits: a few MB at most."""
    s = catalog.find_target(target).int4
    cfg = v.config
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    layers = v.params - embed - (0 if cfg.get("tie_word_embeddings") else embed)  # every decoder matrix

    def at(bits: int, n: int) -> float:
        return n * (bits + 32 / s.block_size + (0 if s.symmetric else 4 / s.block_size)) / 8

    streamed = s.method == "stream" and streamable(cfg)
    if not streamed:
        table, head = embed * 4, at(4, embed)
    elif s.embeddings == SHARED and cfg.get("tie_word_embeddings"):
        table, head = 0, at(s.lm_head_bits, embed)  # stored once, read by the lookup and the LM head
    else:
        # an untied checkpoint under embeddings shared gets an int8 table of its own (build/plan.py)
        table = embed * 4 if s.embeddings == "float" else at(EMBEDDING_BITS.get(s.embeddings, 8), embed)
        head = at(s.lm_head_bits, embed)
    weights = int(at(4, layers) + head + table)
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    kv_cache = kv_cache_bytes(cfg["num_hidden_layers"], kv_heads, head_dim(cfg), context, 4)
    return {"weights": weights, "kv_cache": kv_cache, "total": weights + kv_cache + int(RUNTIME_OVERHEAD)}


def rows() -> list[dict]:
    out = []
    for v in sorted(catalog.variants().values(), key=lambda v: (not v.buildable, v.params, v.name)):
        row = {"name": v.name, "hf_id": v.hf_id, "params_b": round(v.params / 1e9, 2),
               "buildable": v.buildable, "chat_format": v.chat_format, "tasks": v.tasks,
               "context": v.config.get("max_position_embeddings"), "summary": v.summary}
        if v.buildable:
            row["int4_gb"] = round(int4_footprint(v)["weights"] / GB, 2)
        else:
            row["reason"] = v.reason
        out.append(row)
    return out


def recommend(ram: str, task: str | None = None) -> dict:
    """The largest buildable variant for the task whose int4 build fits the device's memory.

    A bigger model at a shorter context is preferred to a smaller one at a longer context, down to
    the shortest context in CONTEXTS.
    """
    budget = parse_size(ram) * RAM_SHARE
    known_tasks = sorted({t for v in catalog.variants().values() for t in v.tasks})
    if task and task not in known_tasks:
        raise ConfigError("--task", [f"unknown task {task!r} (known: {', '.join(known_tasks)})"])
    candidates = [v for v in catalog.variants().values() if v.buildable and (task is None or task in v.tasks)]
    fitting = []
    for v in candidates:
        for context in CONTEXTS:
            foot = int4_footprint(v, context)
            if foot["total"] <= budget:
                fitting.append((v, context, foot))
                break
    if not fitting:
        v, foot = min(((v, int4_footprint(v, CONTEXTS[-1])) for v in candidates), key=lambda vf: vf[1]["total"])
        raise ConfigError("--recommend", [f"no {task + ' ' if task else ''}variant fits {ram}: the smallest, "
                                          f"{v.name}, needs {foot['total'] / GB:.1f} GB at int4 with a "
                                          f"{CONTEXTS[-1]}-token context, over the {budget / GB:.1f} GB an app "
                                          f"may use ({RAM_SHARE:.0%} of {ram})"])
    # Largest first; among equals, the one whose tasks list the asked task earliest (the specialist).
    fitting.sort(key=lambda vcf: (vcf[0].params, -vcf[0].tasks.index(task) if task else 0, vcf[1], vcf[0].name))
    best, context, foot = fitting[-1]
    return {"name": best.name, "hf_id": best.hf_id, "task": task, "ram_budget_gb": round(budget / GB, 2),
            "int4_weights_gb": round(foot["weights"] / GB, 2), "kv_cache_gb": round(foot["kv_cache"] / GB, 2),
            "total_gb": round(foot["total"] / GB, 2), "context": context,
            "alternatives": [v.name for v, _, _ in reversed(fitting[:-1])], "why": best.summary}
