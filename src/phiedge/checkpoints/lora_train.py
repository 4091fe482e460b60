"""A small LoRA fine-tune of a checkpoint with PEFT, on one standard library package: an adapter that visibly
changes the model (its held-out perplexity on the package falls) in a minute on 2 cores, with nothing downloaded."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from phiedge.checkpoints import tokenizer_files
from phiedge.checkpoints.corpus import package_split, token_stream
from phiedge.checkpoints.fp32 import load_reference
from phiedge.checkpoints.lora import MODULES
from phiedge.workspace import check_output, staged_dir

RECORD = "phiedge_lora.json"  # how the adapter was trained, beside PEFT's files
HELD_OUT_TOKENS = 2048


def held_out_loss(model, ids: list[int], seq_len: int = 512) -> float:
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            x = torch.tensor([ids[start:start + seq_len + 1]])
            if x.shape[1] < 2:
                break
            loss = model(input_ids=x, labels=x).loss.item()
            total, n = total + loss * (x.shape[1] - 1), n + x.shape[1] - 1
    return total / n


def train_lora(base: str | Path, out: str | Path, package: str = "email", rank: int = 8, alpha: int = 16,
               modules: tuple[str, ...] = MODULES, steps: int = 60, batch: int = 8, seq_len: int = 128,
               lr: float = 3e-3, seed: int = 0, force: bool = False, progress=None) -> dict:
    """Train a LoRA adapter of `base` on the package's training modules; write PEFT's folder and a record of the
    base's and the adapted model's held-out perplexity on the package's held-out modules."""
    import torch
    from peft import LoraConfig, get_peft_model

    progress = progress or (lambda items, _label: items)
    check_output(Path(out), force)
    train_files, held_files = package_split(package)
    tokenizer = tokenizer_files.load(base)
    data = torch.tensor(token_stream(tokenizer, train_files))
    held = token_stream(tokenizer, held_files)[:HELD_OUT_TOKENS]
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_reference(base)
    base_loss = held_out_loss(model, held)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                             target_modules=[m.split(".")[-1] for m in modules]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    started, losses = time.perf_counter(), []
    for _ in progress(range(steps), "lora steps"):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    adapted_loss = held_out_loss(model, held)
    record = {"base": str(Path(base).resolve()), "package": package, "rank": rank, "alpha": alpha,
              "modules": list(modules), "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
              "train_tokens": len(data), "held_out_files": [f.name for f in held_files], "held_out_tokens": len(held),
              "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
              "held_out_perplexity_base": round(math.exp(base_loss), 2),
              "held_out_perplexity_adapted": round(math.exp(adapted_loss), 2),
              "seconds": round(time.perf_counter() - started, 1)}
    out = Path(out)
    with staged_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return {"path": str(out), **record}
