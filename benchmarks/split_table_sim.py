"""Which rows a split table should keep at 8 bits, and how its 4-bit rows should be rounded, before any ONNX build.

    python benchmarks/split_table_sim.py --model DIR [--block 128]

The layers as the cpu target quantizes them (GPTQ, layer 0's qkv_proj at 8 bits), every weight replaced in
PyTorch by its dequantized value (as benchmarks/gptq_sim.py does; no int8 activations); then the tied table
by each choice, KL against fp32 over the held-out ids. Rows are ranked by the calibration outputs' mean
probability (what `eight_bit_rows` uses), by how often each token occurs in the calibration text, or at
random; the 4-bit rows by the mse search or by GPTQ from the LM head's input second moments, each also through
the LM head alone and through the embedding lookup alone. One JSON line per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_sim import KINDS, QKV0, logits, quantized_copy  # noqa: E402

from phiedge.checkpoints import tokenizer_files
from phiedge.checkpoints.corpus import calibration_ids, eval_ids
from phiedge.checkpoints.fp32 import load_reference
from phiedge.quantize import calibrate, gptq
from phiedge.quantize.quantizer import dequantize, quantize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained tied checkpoint (phiedge train)")
    parser.add_argument("--block", type=int, default=128, help="block size (default 128)")
    args = parser.parse_args()
    block = args.block
    ref = load_reference(args.model, layerwise=False)
    ids = eval_ids(args.model, 2048)
    log_p = torch.log_softmax(logits(ref, ids), -1)
    run = calibrate.Calibration(args.model)
    moments = {n: h.numpy() for i, layer in run.layers(full=True) if i != "lm_head" for n, h in layer.items()}
    cal = calibration_ids(tokenizer_files.load(args.model), calibrate.TOKENS, None)
    with torch.no_grad():
        hidden = torch.cat([ref(torch.tensor([cal[s:s + 512]]), output_hidden_states=True).hidden_states[-1][0]
                            for s in range(0, len(cal), 512)])
        probability = torch.softmax(hidden @ ref.lm_head.weight.T, -1).mean(0).numpy()
    head_moments = hidden.T @ hidden / hidden.shape[0]
    base = quantized_copy(ref, moments, run.importance, block, KINDS, {QKV0})
    table = ref.model.embed_tokens.weight.detach().numpy().astype(np.float32)
    vocab, imp = table.shape[0], run.importance["lm_head"]
    q8 = dequantize(*quantize(table, 8, block, True, "mse", imp), 8, block, table.shape)
    cold = {"mse": dequantize(*quantize(table, 4, block, True, "mse", imp), 4, block, table.shape),
            "gptq": dequantize(*gptq.quantize(table, head_moments, 4, block, True), 4, block, table.shape)}
    freq = np.bincount(np.array(cal), minlength=vocab).astype(float)
    rankings = {"mean probability": np.argsort(-probability),
                "calibration frequency": np.argsort(-(freq + 1e-9 * probability)),
                "random": np.random.default_rng(0).permutation(vocab)}

    def kl(embedding, head) -> float:
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(embedding.copy()))
            model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head.copy()))
        log_q = torch.log_softmax(logits(model, ids), -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0).mean())

    sorted_p = np.sort(probability)[::-1]
    print(json.dumps({"vocab": vocab, "mass_of_top": {f: float(sorted_p[:round(f * vocab)].sum())
                                                      for f in (0.02, 0.05, 0.1, 0.2)}}), flush=True)
    for share in (0.0, 0.02, 0.05, 0.1, 0.2, 1.0):
        for name, order in rankings.items():
            if share in (0.0, 1.0) and name != "mean probability":
                continue
            for rounding, rows in cold.items():
                if rounding == "gptq" and name != "mean probability":
                    continue
                hot = order[:round(share * vocab)]
                split = rows.copy()
                split[hot] = q8[hot]
                row = {"share": share, "ranking": name, "four_bit_rows_by": rounding, "kl": kl(split, split)}
                if share in (0.0, 0.1) and name == "mean probability":
                    row.update(kl_head_only=kl(table, split), kl_embedding_only=kl(split, table))
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
