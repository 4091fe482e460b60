import json

from phiedge.genai_config import apply_runtime


def write(tmp_path, context_length):
    cfg = {"model": {"context_length": context_length, "decoder": {"filename": "model.onnx"}},
           "search": {"max_length": context_length, "top_k": 50}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))


def test_caps_max_length_and_sets_threads(tmp_path):
    write(tmp_path, 131072)
    assert apply_runtime(tmp_path, 4096, 2) == {"max_length": 4096, "context_length": 131072,
                                                "intra_op_num_threads": 2}
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    assert cfg["search"] == {"max_length": 4096, "top_k": 50}
    assert cfg["model"]["decoder"]["session_options"] == {"intra_op_num_threads": 2}


def test_cap_never_exceeds_the_model(tmp_path):
    write(tmp_path, 2048)
    assert apply_runtime(tmp_path, 4096, 1)["max_length"] == 2048
