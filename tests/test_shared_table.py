"""One quantized table for a tied checkpoint: the embedding lookup reads the LM head's MatMulNBits weight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from phiedge.artifacts import ModelFolder
from phiedge.build.graph_fixes import share_tied_table
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.checks.budget import weight_accounting
from phiedge.checks.greedy import greedy_parity
from phiedge.cli import cli
from phiedge.errors import BuildError, ConfigError
from phiedge.quantize import prequant

# Round to nearest, uncalibrated, every layer matrix at 4 bits: the same bytes for a table of its own and for a shared
# one (a calibrated table takes the LM head's importance, a table of its own none)
BASE = {"quantizer": "rtn", "calibrate": False, "eight_bit": []}
EIGHT_BITS = {"embeddings": "int8", "lm_head_bits": 8, **BASE}


@pytest.fixture(scope="module")
def pair(checkpoints, tmp_path_factory):
    """The tied phi-4-mini built twice with the same 8-bit table: separate, and shared through the CLI's path."""
    root = tmp_path_factory.mktemp("shared")
    ckpt = checkpoints["phi-4-mini"]
    build(ckpt, "cpu", root / "separate", BuildOptions(int4=EIGHT_BITS, validate=False))
    build(ckpt, "cpu", root / "shared", BuildOptions(int4={"embeddings": "shared", "lm_head_bits": 8, **BASE},
                                                     validate=False))
    return root / "separate", root / "shared"


def graph(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def lengths(folder) -> dict[str, int]:
    return {t.name: int({e.key: e.value for e in t.external_data}["length"]) for t in graph(folder).initializer
            if t.external_data}


def test_shared_build_stores_the_table_once(pair):
    separate, shared = pair
    g = graph(shared)
    gather = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    assert gather.input[0] == head.input[1]  # the lookup reads the LM head's weight initializer itself
    assert not any(name.startswith("model.embed_tokens.") for name in lengths(shared))
    table = lengths(separate)
    saved = table["model.embed_tokens.qweight"] + table["model.embed_tokens.scales"]
    data = (separate / "model.onnx.data").stat().st_size - (shared / "model.onnx.data").stat().st_size
    assert data == saved > 0  # the table's bytes, no more, no less
    assert {k: v for k, v in table.items() if not k.startswith("model.embed_tokens.")} == lengths(shared)


def test_shared_build_computes_what_the_separate_one_does(pair, checkpoints):
    import onnxruntime as ort

    separate, shared = pair
    ids = np.random.default_rng(0).integers(0, 2048, (1, 48)).astype(np.int64)
    logits = []
    for folder in pair:
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
        logits.append(session.run(["logits"], feed)[0])
    assert np.array_equal(logits[0], logits[1])
    assert [r["built"] for r in greedy_parity(shared, checkpoints["phi-4-mini"])] == \
        [r["built"] for r in greedy_parity(separate, checkpoints["phi-4-mini"])]


def test_weight_accounting_counts_the_shared_table_once(pair):
    separate, shared = pair
    acct, before = weight_accounting(ModelFolder(shared)), weight_accounting(ModelFolder(separate))
    assert acct["data_file_bytes"] == (shared / "model.onnx.data").stat().st_size == acct["initializer_bytes"]
    assert acct["ideal_bytes"] == acct["initializer_bytes"]
    assert before["ideal_bytes"] - acct["ideal_bytes"] == before["data_file_bytes"] - acct["data_file_bytes"]
    record = json.loads((shared / "phiedge_build.json").read_text())
    assert record["weights"] == acct and record["int4"]["embeddings"] == "shared"


def test_the_fix_refuses_tables_that_are_not_one(pair, tmp_path):
    separate, _ = pair
    folder = tmp_path / "m"
    shutil.copytree(separate, folder)
    g = graph(folder)
    table = next(t for t in g.initializer if t.name == "model.embed_tokens.qweight")
    offset = int({e.key: e.value for e in table.external_data}["offset"])
    with open(folder / "model.onnx.data", "r+b") as f:  # one byte of the table changed: two tables now
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 1]))
    before = (folder / "model.onnx.data").read_bytes()
    with pytest.raises(BuildError, match="differ"):
        share_tied_table(folder / "model.onnx")
    assert (folder / "model.onnx.data").read_bytes() == before  # nothing rewritten
    with open(folder / "model.onnx.data", "r+b") as f:
        f.seek(offset + 100)
        f.write(byte)
    assert share_tied_table(folder / "model.onnx") > 0


def test_the_fix_refuses_a_4_bit_head_under_an_8_bit_table(checkpoints, tmp_path):
    folder = tmp_path / "m"
    build(checkpoints["phi-4-mini"], "cpu", folder, BuildOptions(int4={"embeddings": "int8", "lm_head_bits": 4, **BASE},
                                                                 validate=False))
    with pytest.raises(BuildError, match="differ"):
        share_tied_table(folder / "model.onnx")


def test_shared_needs_a_tied_checkpoint(checkpoints, runner, tmp_path):
    from phiedge.cli import cli

    with pytest.raises(ConfigError, match="tie_word_embeddings is false"):
        plan(checkpoints["phi-3-mini-4k"], "cpu", BuildOptions(int4={"embeddings": "shared"}))
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-3-mini-4k"],
                                 "--embeddings", "shared", "--dry-run"])
    assert result.exit_code != 0 and "tie_word_embeddings is false" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert plan(checkpoints["phi-4-mini"], "cpu", BuildOptions(int4={"embeddings": "shared"})).int4.embeddings \
        == prequant.SHARED
    with pytest.raises(BuildError, match="tie_word_embeddings"):  # the writer refuses as well, writing nothing
        prequant.write(Path(checkpoints["phi-3-mini-4k"]), tmp_path / "q", 128, True, embeddings="shared")
    assert not (tmp_path / "q").exists()


def test_write_quantizes_a_shared_table_once(checkpoints, tmp_path):
    from safetensors import safe_open

    ckpt = checkpoints["phi-4-mini"]
    quant, _ = prequant.write(Path(ckpt), tmp_path / "q", 128, True, lm_head_bits=8, embeddings="shared")
    assert quant["tie_word_embeddings"] and quant["embeds"]  # Olive's loader makes its LM head the table
    assert quant["overrides"] == {"model.embed_tokens": {"bits": 8}}
    names = set()
    for path in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            names.update(f.keys())
    assert "model.embed_tokens.qweight" in names and not any(n.startswith("lm_head.") for n in names)
    assert prequant.count_matrices(ckpt, "shared") == prequant.count_matrices(ckpt, "int8") - 1


def test_a_target_that_shares_gives_an_untied_checkpoint_its_own_table(checkpoints, monkeypatch):
    from phiedge import catalog

    cpu = catalog.find_target("cpu")
    sharing = cpu.model_copy(update={"int4": cpu.int4.model_copy(update={"embeddings": "shared", "lm_head_bits": 8})})
    monkeypatch.setattr(catalog, "find_target", lambda name: sharing)
    p = plan(checkpoints["phi-3-mini-4k"], "cpu")
    assert (p.int4.embeddings, p.int4.lm_head_bits) == ("int8", 8)
    assert "tie_word_embeddings is false" in p.notes[0]
    assert plan(checkpoints["phi-4-mini"], "cpu").int4.embeddings == "shared"


def test_shared_build_passes_the_check_against_its_dequantized_weights(pair, checkpoints, runner):
    """The dequantized reference of a shared build quantizes the table once at the head's bits, as the build
    does; were it to quantize the table at int8's default instead, the head-to-table mismatch would fail."""
    result = runner.invoke(cli, ["validate", str(pair[1]), "--reference", checkpoints["phi-4-mini"],
                                 "--json", str(pair[1].parent / "shared-validation.json")])
    report = json.loads((pair[1].parent / "shared-validation.json").read_text())
    dq = report["dequantized"]
    assert result.exit_code == 0, result.output
    assert dq["applies"] and dq["passed"] and dq["metrics"]["logits_rel_rms"] < dq["thresholds"]["logits_rel_rms"] / 2
