"""Corrections to what the model builder writes, where it is measurably wrong."""

from __future__ import annotations

from pathlib import Path

NORM_OPS = {"LayerNormalization", "SkipLayerNormalization"}


def layernorm_epsilon(onnx_path: Path, hf_config: dict) -> int:
    """Set LayerNorm epsilon to the checkpoint's `layer_norm_eps`; return how many nodes changed.

    The builder reads only `rms_norm_eps` and falls back to 1e-6, so Phi-2 (layer_norm_eps 1e-5)
    gets fp32 logits off by up to 0.02 and greedy tokens that drift from transformers'.
    Only the graph's attributes change; the external weight file is untouched.
    """
    import onnx

    eps = hf_config.get("layer_norm_eps")
    if eps is None or "rms_norm_eps" in hf_config:
        return 0
    model = onnx.load(str(onnx_path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type in NORM_OPS:
            for attr in node.attribute:
                if attr.name == "epsilon" and abs(attr.f - eps) > 1e-12:
                    attr.f = float(eps)
                    changed += 1
    if changed:
        onnx.save(model, str(onnx_path))
    return changed
