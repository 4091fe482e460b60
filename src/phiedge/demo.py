"""`phiedge demo`: the whole pipeline on a Phi-4-mini-shaped model made here, since none can be downloaded."""

from __future__ import annotations

from pathlib import Path

from phiedge.build.plan import BuildOptions
from phiedge.build.stages import build
from phiedge.bundle.generate import chat_prompt, generate
from phiedge.bundle.model_safety import load
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.progress import Progress

DEMO_SHRINK = Shrink(layers=2, heads=6, kv_heads=2, intermediate=1024, vocab=4096)


def demo(out: str | Path, like: str = "phi-4-mini", force: bool = False, progress: Progress | None = None) -> dict:
    """Synthesize, build fp32 and int4 for CPU, validate both against transformers, chat once.

    The fp32 build must match PyTorch (validation fails the build otherwise). The int4 build's numbers
    against the original are reported but not enforced, because quantization error on random weights means
    nothing; its check against the dequantized reference (the weights it was given) is enforced.
    """
    progress = progress or Progress(quiet=True)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    progress.step(f"synthesizing a shrunk {like} checkpoint in {ckpt}")
    made = synth(like, ckpt, DEMO_SHRINK, seed=0, force=force, progress=progress.iterate)
    builds = {}
    for name, precision in (("cpu-fp32", "fp32"), ("cpu-int4", None)):
        r = build(ckpt, "cpu", out / name, BuildOptions(precision=precision), force=force, progress=progress)
        v = r["validation"]
        builds[name] = {"path": str(out / name), "precision": r["precision"], "size_bytes": r["size_bytes"],
                        "build_seconds": r["build_seconds"], "max_length": r["runtime"]["max_length"],
                        "threads": r["runtime"]["intra_op_num_threads"], "greedy_identical": v["greedy"],
                        "kl_mean": v["kl_mean"], "top1": v["top1"], "ppl_ratio": v["ppl_ratio"],
                        "validation_enforced": v["enforced"], "validation_passed": v["passed"],
                        "dequantized_check": dequantized_summary(v["dequantized"])}
    return {"checkpoint": {"path": str(ckpt), "like": made["like"], "params": made["params"], "shrunk": made["shrunk"]},
            "builds": builds, "sample": sample_reply(out / "cpu-int4", "Write a function that reverses a list.")}


def dequantized_summary(report: dict) -> dict:
    if not report["applies"]:
        return {"applies": False, "why": report["why"]}
    return {"applies": True, "passed": report["passed"], **{k: report["metrics"][k] for k in report["thresholds"]}}


def sample_reply(model_dir: Path, user: str, max_new_tokens: int = 24) -> dict:
    """A chat turn through the model's own template (random weights: the text itself is noise)."""
    model, tokenizer = load(model_dir)
    prompt = chat_prompt(tokenizer, user)
    tokens = list(generate(model, list(tokenizer.encode(prompt)), max_new_tokens))
    return {"prompt": prompt, "new_tokens": len(tokens), "text": tokenizer.decode(tokens)}
