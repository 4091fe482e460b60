"""One tied table at two precisions (`eight_bit_rows`): its most probable rows at 8 bits, the rest at 4, both parts
read by the LM head's kernels and the embedding lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from phiedge.artifacts import ModelFolder
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.checks import dequantized
from phiedge.cli import cli
from phiedge.quantize import calibrate, prequant, split_table
from phiedge.quantize.quantizer import dequantize, quantize
from phiedge.schema import Int4Settings

SPLIT = {"quantizer": "mse", "calibrate": True, "eight_bit": [], "embeddings": "shared", "lm_head_bits": 4,
         "eight_bit_rows": 0.25}


def test_the_most_probable_rows_are_hot_and_every_row_has_one_place():
    probability = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    hot = split_table.hot_rows(probability, 0.4)
    assert hot.tolist() == [1, 3]
    positions = split_table.positions_of(hot, 5)
    assert positions.tolist() == [2, 0, 3, 1, 4]  # [hot 1, hot 3, cold 0, cold 2, cold 4]
    assert split_table.hot_rows(probability, 0.01).tolist() == [1]  # at least one row
    assert len(split_table.hot_rows(probability, 0.99)) == 4  # never every row


def test_each_part_is_the_quantizer_on_its_rows_and_the_table_comes_back_in_token_order():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    importance = rng.random(64).astype(np.float32)
    hot = split_table.hot_rows(rng.random(300), 0.1)
    parts = split_table.quantize_split(table, hot, 32, importance)
    cold = np.setdiff1d(np.arange(300), hot)
    for part, rows, bits in ((split_table.HOT, hot, 8), (split_table.COLD, cold, 4)):
        packed, scales, _ = quantize(table[rows], bits, 32, True, "mse", importance)
        assert np.array_equal(parts[f"{part}.packed"], packed) and np.array_equal(parts[f"{part}.scales"], scales)
    back = split_table.table(parts, 32, table.shape)
    for rows, bits in ((hot, 8), (cold, 4)):
        assert np.array_equal(back[rows], dequantize(*quantize(table[rows], bits, 32, True, "mse", importance), bits,
                                                     32, (len(rows), 64)))
    assert np.abs(back[hot] - table[hot]).max() < np.abs(back[cold] - table[cold]).max() / 8


def test_with_the_heads_second_moments_the_cold_rows_are_gptqs():
    import torch

    from phiedge.quantize import gptq

    rng = np.random.default_rng(1)
    table = rng.standard_normal((200, 64)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((500, 64)).astype(np.float32)) * torch.linspace(0.1, 3, 64)
    moments = x.T @ x / 500
    hot = split_table.hot_rows(rng.random(200), 0.1)
    cold = np.setdiff1d(np.arange(200), hot)
    parts = split_table.quantize_split(table, hot, 32, moments.diagonal().numpy(), cold_moments=moments)
    packed, scales, _ = gptq.quantize(table[cold], moments, 4, 32, True)
    assert np.array_equal(parts[f"{split_table.COLD}.packed"], packed)
    assert np.array_equal(parts[f"{split_table.COLD}.scales"], scales)
    mse = split_table.quantize_split(table, hot, 32, moments.diagonal().numpy())
    assert np.array_equal(parts[f"{split_table.HOT}.packed"], mse[f"{split_table.HOT}.packed"])  # hot: mse either way


def test_eight_bit_rows_needs_a_shared_calibrated_4_bit_table():
    for wrong in ({"embeddings": "int8"}, {"lm_head_bits": 8}, {"calibrate": False, "quantizer": "mse"}):
        with pytest.raises(ValidationError, match="eight_bit_rows"):
            Int4Settings(**{"method": "stream", **SPLIT, **wrong})
    with pytest.raises(ValidationError, match="eight_bit_rows"):
        Int4Settings(eight_bit_rows=0.1)  # method builder


def test_an_untied_checkpoint_gets_two_8_bit_tables_instead(checkpoints):
    p = plan(checkpoints["phi-3-mini-4k"], "cpu", BuildOptions(int4={k: v for k, v in SPLIT.items()
                                                                     if k not in ("embeddings",)}))
    assert (p.int4.embeddings, p.int4.lm_head_bits, p.int4.eight_bit_rows) == ("int8", 8, 0.0)
    assert any("split table" in note for note in p.notes)


def test_the_cli_passes_the_share_and_refuses_it_without_a_shared_4_bit_table(checkpoints, runner):
    ckpt = checkpoints["phi-4-mini"]
    ok = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "--lm-head-bits", "4",
                             "--eight-bit-rows", "0.1", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    wrong = runner.invoke(cli, ["build", "--target", "cpu", "--model", ckpt, "--eight-bit-rows", "0.1", "--dry-run"])
    assert wrong.exit_code != 0 and "eight_bit_rows" in wrong.output and "Traceback" not in wrong.output


@pytest.fixture(scope="module")
def split_build(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "m"
    build(checkpoints["phi-4-mini"], "cpu", out, BuildOptions(int4=SPLIT))
    return out


def graph(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def test_the_split_build_holds_two_parts_once_and_passes_its_dequantized_check(split_build, checkpoints):
    g = graph(split_build)
    heads = {n.name: {a.name: a.i for a in n.attribute} for n in g.node if n.op_type == "MatMulNBits"
             and n.input[1].startswith("lm_head.")}
    vocab = json.loads((split_build / "config.json").read_text())["vocab_size"]
    hot = round(vocab * SPLIT["eight_bit_rows"])
    assert {(a["bits"], a["N"]) for a in heads.values()} == {(8, hot), (4, vocab - hot)}
    gathers = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    assert sorted(n.input[0] for n in gathers) == sorted(n.input[1] for n in g.node if n.name in heads)
    assert not any(t.name.startswith("model.embed_tokens.") for t in g.initializer)  # the builder's table is gone
    report = json.loads((split_build / "validation.json").read_text())
    dq = report["dequantized"]
    assert dq["passed"] and not dq["digests"]["mismatched"], dq
    assert dq["metrics"]["logits_rel_rms"] < dq["thresholds"]["logits_rel_rms"] / 2
    # the hot rows are the ones the calibration gave the most probability
    from safetensors.numpy import load_file

    probability = load_file(str(split_build / calibrate.IMPORTANCE))[split_table.ROW_PROBABILITY]
    positions = dequantized.GraphWeights(ModelFolder(split_build))._array(split_table.POSITIONS)
    assert np.array_equal(np.sort(np.flatnonzero(positions < hot)), split_table.hot_rows(probability, 0.25))


def test_the_split_build_stores_each_row_once_at_its_bits(split_build):
    """The data file holds the hot rows at 8 bits, the cold ones at 4, the positions and the layers: one 4-bit
    table's bytes plus the hot rows' other half and 8 bytes a token, nothing of the builder's table."""
    vocab, hidden = (json.loads((split_build / "config.json").read_text())[k] for k in ("vocab_size", "hidden_size"))
    hot = round(vocab * SPLIT["eight_bit_rows"])
    lengths = {t.name: int({e.key: e.value for e in t.external_data}["length"]) for t in graph(split_build).initializer
               if t.external_data}
    assert lengths[f"{split_table.HOT}.MatMulNBits.qweight"] == hot * hidden
    assert lengths[f"{split_table.COLD}.MatMulNBits.qweight"] == (vocab - hot) * hidden // 2
    assert lengths[split_table.POSITIONS] == vocab * 8
    assert sum(lengths.values()) == (split_build / "model.onnx.data").stat().st_size


@pytest.mark.parametrize("fault", ["positions", "hot"])
def test_the_dequantized_check_catches_a_damaged_split_table(split_build, tmp_path, fault):
    folder = tmp_path / "m"
    shutil.copytree(split_build, folder)
    name = split_table.POSITIONS if fault == "positions" else f"{split_table.HOT}.MatMulNBits.qweight"
    tensor = next(t for t in graph(folder).initializer if t.name == name)
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    with open(folder / "model.onnx.data", "r+b") as f:
        f.seek(offset)
        first = f.read(16)
        # positions: two tokens' rows swapped (still a permutation); hot: one byte of the first 8-bit row changed
        damaged = first[8:] + first[:8] if fault == "positions" else bytes([first[0] ^ 0x10]) + first[1:]
        f.seek(offset)
        f.write(damaged)
    model = ModelFolder(folder)
    recorded = dequantized.digests_of(model)
    assert dequantized.mismatched(dequantized.GraphWeights(ModelFolder(split_build)), recorded) == []
    assert dequantized.mismatched(dequantized.GraphWeights(model), recorded) == \
        [split_table.POSITIONS if fault == "positions" else split_table.HOT]


def test_write_refuses_a_split_without_the_calibration_s_probabilities(checkpoints, tmp_path):
    from phiedge.errors import BuildError

    with pytest.raises(BuildError, match="output probabilities"):
        prequant.write(Path(checkpoints["phi-4-mini"]), tmp_path / "q", 128, True, embeddings="shared",
                       quantizer="mse", eight_bit_rows=0.1, split_file=tmp_path / "split.safetensors")
