"""A small Phi-shaped model trained here on the Python standard library, for measuring quality.

Random weights give near-flat next-token distributions, on which quantization error tells nothing.
A few hundred steps on stdlib code (in the spirit of Phi-1's code-textbook data) give sharp
distributions and a perplexity far below uniform, in minutes on 2 CPU cores, reproducibly.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from phiedge.checkpoints.checkpoint import SYNTH_FILE, weight_digests
from phiedge.checkpoints.corpus import eval_ids, split_files, token_stream
from phiedge.checkpoints.synth import Shrink, synth
from phiedge.workspace import staged_dir

# Phi-4-mini's head dimension, GQA ratio (3:1), partial rotary, LongRoPE and tied embeddings.
TRAIN_SHRINK = Shrink(layers=2, heads=3, kv_heads=1, intermediate=768, vocab=4096)


def train(out: str | Path, like: str = "phi-4-mini", shrink: Shrink = TRAIN_SHRINK, steps: int = 600,
          batch: int = 16, seq_len: int = 128, lr: float = 3e-3, seed: int = 0, force: bool = False,
          progress=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress or (lambda items, _label: items)
    out = Path(out)
    with staged_dir(out, force=force) as tmp:
        synth(like, tmp / "init", shrink, seed=seed, dtype="fp32")
        torch.manual_seed(seed)
        torch.set_num_threads(os.cpu_count() or 1)
        tokenizer = AutoTokenizer.from_pretrained(tmp / "init")
        model = AutoModelForCausalLM.from_pretrained(tmp / "init", dtype=torch.float32)
        data = torch.tensor(token_stream(tokenizer, split_files()[0]))
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        model.train()
        started, losses = time.perf_counter(), []
        for _ in progress(range(steps), "train steps"):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
            x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        held_out = torch.tensor([eval_ids(tmp / "init", 2048)])
        with torch.no_grad():
            eval_loss = model(input_ids=held_out, labels=held_out).loss.item()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            (tmp / "init" / name).unlink()
        for f in (tmp / "init").iterdir():
            f.rename(tmp / f.name)
        (tmp / "init").rmdir()
        model.save_pretrained(tmp, safe_serialization=True)
        record = json.loads((tmp / SYNTH_FILE).read_text())
        record["trained"] = {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
                             "tokens_seen": steps * batch * seq_len, "train_tokens": len(data),
                             "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                             "held_out_loss": round(eval_loss, 4), "held_out_perplexity": round(math.exp(eval_loss), 2),
                             "uniform_perplexity": model.config.vocab_size,
                             "seconds": round(time.perf_counter() - started, 1)}
        record["weights_sha256"] = weight_digests(tmp)  # the trained weights, not the random ones synth wrote
        (tmp / SYNTH_FILE).write_text(json.dumps(record, indent=2))
    return {"path": str(out), **record}
