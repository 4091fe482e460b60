"""The original model in PyTorch (transformers, fp32), and greedy agreement of a built model with it."""

from __future__ import annotations

from pathlib import Path

from phiedge.bundle.generate import generate
from phiedge.bundle.model_safety import load
from phiedge.checkpoints import tokenizer_files
from phiedge.checkpoints.fp32 import load_reference

PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Queue:\n    \"\"\"A first-in, first-out queue.\"\"\"\n",
)


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=model.generation_config.pad_token_id or (eos[0] if isinstance(eos, list) else eos))
    return out[0, len(prompt_ids):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_metrics(model, reference, tokenizer, prompts: tuple[str, ...], n_tokens: int, adapter=None) -> dict:
    """Greedy tokens of a loaded onnxruntime-genai model (with `adapter` active: generate.load_adapter's) and of
    transformers, prompt by prompt."""
    rows = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        built = list(generate(model, ids, n_tokens, adapter=adapter))
        ref = reference_greedy(reference, ids, n_tokens)
        rows.append({"prompt": text, "agree": common_prefix(built, ref), "of": len(ref), "identical": built == ref,
                     "built": built, "reference": ref})
    return {"prompts": rows, "greedy": sum(r["identical"] for r in rows) / len(rows)}


def greedy_parity(built_dir: str | Path, reference_dir: str | Path, max_new_tokens: int = 32,
                  prompts: tuple[str, ...] = PROMPTS) -> list[dict]:
    """greedy_metrics' rows for a built folder and a checkpoint folder."""
    model, _ = load(built_dir)
    tokenizer = tokenizer_files.load(reference_dir)
    return greedy_metrics(model, load_reference(reference_dir), tokenizer, prompts, max_new_tokens)["prompts"]
