"""A checkpoint whose weights script its greedy reply, for tests that need a model to write something particular
(a `<think>` block) and random weights never would.

Every layer's attention and MLP output projections are zero, so the last hidden state is the current token's
embedding; the LM head's row for each token of the chain is the final norm of the previous token's embedding,
scaled, so greedy decoding follows the chain token by token. The rest of the LM head is shrunk towards zero. It is
an ordinary checkpoint: phiedge builds it, onnxruntime-genai runs it, and the reply comes from its logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

MARGIN = 30.0  # the chain's next token's logit; the others' are about MARGIN / sqrt(hidden) or less


def script(model_dir: Path, chain: list[str]) -> list[int]:
    """Make the checkpoint at model_dir (one safetensors file, fp32, untied LM head) answer `chain[1:]` after a
    prompt ending in chain[0]; each piece of the chain must be one token, and no token may repeat. Returns the ids."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for piece in chain:
        [token] = tokenizer.encode(piece, add_special_tokens=False)
        ids.append(token)
    assert len(set(ids)) == len(ids), f"a token repeats in {chain}"
    path = Path(model_dir) / "model.safetensors"
    weights = load_file(path)
    for name, tensor in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor.zero_()
    embedding, norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
    head = weights["lm_head.weight"]
    head.mul_(1e-3)
    for previous, token in zip(ids, ids[1:]):
        e = embedding[previous]
        normed = e * torch.rsqrt(e.pow(2).mean() + 1e-5) * norm
        head[token] = MARGIN * normed / normed.pow(2).sum()
    save_file(weights, path, metadata={"format": "pt"})
    return ids
