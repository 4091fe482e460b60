import shutil

import onnx

from phiedge.build.graph_fixes import layernorm_epsilon
from phiedge.checks.greedy import greedy_parity


def epsilons(path):
    model = onnx.load(str(path), load_external_data=False)
    return {a.f for n in model.graph.node if n.op_type in ("LayerNormalization", "SkipLayerNormalization")
            for a in n.attribute if a.name == "epsilon"}


def test_phi2_build_carries_the_checkpoint_epsilon(builds):
    eps = epsilons(builds("phi-2", "fp32") / "model.onnx")
    assert eps and all(abs(e - 1e-5) < 1e-12 for e in eps)


def test_the_builders_epsilon_breaks_greedy_parity_and_the_fix_restores_it(builds, checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(builds("phi-2", "fp32"), broken)
    model = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "epsilon":
                attr.f = 1e-6  # what onnxruntime-genai's builder writes for Phi-2
    onnx.save(model, str(broken / "model.onnx"))
    assert not all(r["identical"] for r in greedy_parity(broken, checkpoints["phi-2"]))
    config = {"layer_norm_eps": 1e-5}
    assert layernorm_epsilon(broken / "model.onnx", config) > 0
    assert all(r["identical"] for r in greedy_parity(broken, checkpoints["phi-2"]))
    assert layernorm_epsilon(broken / "model.onnx", config) == 0  # idempotent


def test_rms_norm_models_are_left_alone(builds):
    assert layernorm_epsilon(builds("phi-4-mini", "fp32") / "model.onnx", {"rms_norm_eps": 1e-5}) == 0
