"""`phiedge demo`: the whole pipeline on a Phi-4-mini-shaped model made here, since none can be downloaded."""

from __future__ import annotations

from pathlib import Path

from .build import BuildOptions, build
from .errors import PhiedgeError
from .generate import chat_prompt, generate, load
from .progress import Progress
from .reference import greedy_parity, load_reference
from .synth import Shrink, synth

DEMO_SHRINK = Shrink(layers=2, heads=6, kv_heads=2, intermediate=1024, vocab=4096)


class DemoError(PhiedgeError):
    """The demo's own check failed: the fp32 export does not match transformers."""


def demo(out: str | Path, like: str = "phi-4-mini", force: bool = False, progress: Progress | None = None) -> dict:
    progress = progress or Progress(quiet=True)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    progress.step(f"synthesizing a shrunk {like} checkpoint in {ckpt}")
    made = synth(like, ckpt, DEMO_SHRINK, seed=0, force=force, progress=progress.iterate)
    records = {}
    for name, precision in (("cpu-fp32", "fp32"), ("cpu-int4", None)):
        records[name] = build(ckpt, "cpu", out / name, BuildOptions(precision=precision), force=force,
                              progress=progress)
    progress.step("comparing greedy tokens with transformers")
    reference = load_reference(ckpt)
    parity = {name: greedy_parity(out / name, ckpt, reference=reference) for name in records}
    summary = {
        "checkpoint": {"path": str(ckpt), "like": made["like"], "params": made["params"], "shrunk": made["shrunk"]},
        "builds": {name: {"path": str(out / name), "precision": r["precision"], "size_bytes": r["size_bytes"],
                          "build_seconds": r["build_seconds"], "max_length": r["runtime"]["max_length"],
                          "threads": r["runtime"]["intra_op_num_threads"],
                          "greedy_identical": sum(p["identical"] for p in parity[name]),
                          "greedy_prompts": len(parity[name]),
                          "greedy_agree_tokens": [p["agree"] for p in parity[name]]}
                   for name, r in records.items()},
    }
    summary["sample"] = sample_reply(out / "cpu-int4", "Write a function that reverses a list.")
    fp32 = summary["builds"]["cpu-fp32"]
    if fp32["greedy_identical"] != fp32["greedy_prompts"]:
        raise DemoError(f"fp32 export disagrees with transformers on greedy tokens: {fp32['greedy_agree_tokens']}")
    return summary


def sample_reply(model_dir: Path, user: str, max_new_tokens: int = 24) -> dict:
    """A chat turn through the model's own template (random weights: the text itself is noise)."""
    model, tokenizer = load(str(model_dir))
    prompt = chat_prompt(tokenizer, user)
    tokens = list(generate(model, list(tokenizer.encode(prompt)), max_new_tokens))
    return {"prompt": prompt, "new_tokens": len(tokens), "text": tokenizer.decode(tokens)}
