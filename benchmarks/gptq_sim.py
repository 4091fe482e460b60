"""What each quantizer choice does to a checkpoint's KL, before any ONNX build: every weight replaced in PyTorch
by its dequantized value (phiedge's own quantizers), KL against fp32 over held-out ids.

    python benchmarks/gptq_sim.py --model trained768 [--tokens 4096 --tokens 8192] [--markdown]

No int8 activations (MatMulNBits at accuracy level 4 adds them), so the KL is below an ONNX build's; the
ranking is what it is for. Each row: the layers' matrices by the mse search (weighted by the calibration's
diagonal) or by GPTQ (from its full second moments), the tied table once at 8 bits (weighted mse), with and
without layer 0's qkv_proj at 8 bits; one JSON line per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch

from phiedge.checkpoints.corpus import eval_ids
from phiedge.checkpoints.fp32 import load_reference
from phiedge.quantize import calibrate, gptq
from phiedge.quantize.quantizer import dequantize, quantize

KINDS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
QKV0 = "model.layers.0.self_attn.qkv_proj"


def logits(model, ids: list[int], window: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids[s:s + window]])).logits[0].double()
                          for s in range(0, len(ids), window)])


def quantized_copy(reference, moments: dict, importance: dict, block: int, gptq_kinds, eight: set):
    model = copy.deepcopy(reference)
    with torch.no_grad():
        table = model.model.embed_tokens.weight.detach().numpy()
        deq = dequantize(*quantize(table, 8, block, True, "mse", importance["lm_head"]), 8, block, table.shape)
        model.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(deq.copy()))
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(deq.copy()))
        for i, layer in enumerate(model.model.layers):
            for kind in KINDS:
                name = f"model.layers.{i}.{kind}"
                module = layer.get_submodule(kind)
                w = module.weight.detach().numpy().astype(np.float32)
                bits = 8 if name in eight else 4
                if kind in gptq_kinds:
                    parts = gptq.quantize(w, moments[name], bits, block, True)
                else:
                    parts = quantize(w, bits, block, True, "mse", importance[name])
                module.weight.copy_(torch.from_numpy(dequantize(*parts, bits, block, w.shape)))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained checkpoint (phiedge train)")
    parser.add_argument("--tokens", type=int, action="append", help="calibration tokens (repeatable; default 4096)")
    parser.add_argument("--block", type=int, action="append", help="block sizes (repeatable; default 128 and 256)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON lines")
    args = parser.parse_args()
    reference = load_reference(args.model, layerwise=False)
    ids = eval_ids(args.model, 2048)
    log_p = torch.log_softmax(logits(reference, ids), -1)
    rows = []
    for tokens in args.tokens or [calibrate.TOKENS]:
        run = calibrate.Calibration(args.model, tokens=tokens)
        moments = {name: h.numpy() for _, layer in run.layers(full=True) for name, h in layer.items()}
        for block in args.block or [128, 256]:
            for label, kinds in (("mse", ()), ("gptq", KINDS), ("gptq, down_proj by mse", KINDS[:3])):
                row = {"tokens": tokens, "block": block, "layers": label}
                for eight, key in ((set(), "kl"), ({QKV0}, "kl_qkv0_8bit")):
                    model = quantized_copy(reference, moments, run.importance, block, kinds, eight)
                    log_q = torch.log_softmax(logits(model, ids), -1)
                    row[key] = float((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0).mean())
                rows.append(row)
                if not args.markdown:
                    print(json.dumps(row), flush=True)
    if args.markdown:
        print("| calibration tokens | block | layers by | KL | KL, layer 0's qkv_proj at 8 bits |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['tokens']} | {r['block']} | {r['layers']} | {r['kl']:.2e} | {r['kl_qkv0_8bit']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
