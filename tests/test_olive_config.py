from pathlib import Path

from phiedge import catalog
from phiedge.build.olive_config import fill
from phiedge.schema import Int4Settings


def test_fill_sets_model_precision_int4_and_folders(tmp_path):
    target = catalog.find_target("cpu")
    cfg = fill(catalog.load_recipe("cpu"), target, tmp_path / "model", tmp_path / "work",
               int4=Int4Settings(block_size=64, accuracy_level=1, symmetric=False, algorithm="k_quant_mixed"))
    assert cfg["input_model"]["model_path"] == str((tmp_path / "model").resolve())
    builder = cfg["passes"]["builder"]
    assert builder["precision"] == "int4"
    assert (builder["int4_block_size"], builder["int4_accuracy_level"], builder["int4_is_symmetric"],
            builder["int4_algo_config"]) == (64, 1, False, "k_quant_mixed")
    assert builder["extra_options"] == {"hf_token": "false", "hf_remote": False, "prune_lm_head": True}
    assert cfg["output_dir"] == str(tmp_path / "work" / "olive-output")
    assert cfg["systems"]["local_system"]["accelerators"][0]["execution_providers"] == ["CPUExecutionProvider"]


def test_fp32_drops_int4_options():
    cfg = fill(catalog.load_recipe("cpu"), catalog.find_target("cpu"), Path("m"), Path("w"), precision="fp32")
    builder = cfg["passes"]["builder"]
    assert builder["precision"] == "fp32"
    assert not [k for k in builder if k.startswith("int4_")]


def test_fill_does_not_modify_the_recipe():
    recipe = catalog.load_recipe("cpu")
    fill(recipe, catalog.find_target("cpu"), Path("m"), Path("w"))
    assert recipe["input_model"]["model_path"] is None
    assert "output_dir" not in recipe


def test_filled_config_is_valid_for_olive(tmp_path):
    from olive.workflows.run.config import RunConfig

    (tmp_path / "model").mkdir()
    cfg = fill(catalog.load_recipe("cpu"), catalog.find_target("cpu"), tmp_path / "model", tmp_path)
    run = RunConfig.model_validate(cfg)
    assert run.passes["builder"][0].type.lower() == "modelbuilder"


def test_embedding_and_float_node_choices_reach_the_builder():
    cfg = fill(catalog.load_recipe("cpu"), catalog.find_target("cpu"), Path("m"), Path("w"),
               int4=Int4Settings(algorithm="rtn_last", shared_embeddings=False, float_nodes=["/lm_head/MatMul"]))
    builder = cfg["passes"]["builder"]
    assert builder["int4_nodes_to_exclude"] == ["/lm_head/MatMul"]
    assert builder["extra_options"] == {"hf_token": "false", "hf_remote": False, "prune_lm_head": True, "shared_embeddings": False}
    default = fill(catalog.load_recipe("cpu"), catalog.find_target("cpu"), Path("m"), Path("w"), int4=Int4Settings())
    assert "shared_embeddings" not in default["passes"]["builder"]["extra_options"]
    # method stream: the LM head arrives quantized, so the builder must not tie the table to it
    stream = fill(catalog.load_recipe("cpu"), catalog.find_target("cpu"), Path("m"), Path("w"),
                  int4=Int4Settings(method="stream", embeddings="int8"))
    assert stream["passes"]["builder"]["extra_options"]["shared_embeddings"] is False
    assert "int4_nodes_to_exclude" not in default["passes"]["builder"]


def test_gptq_recipe_gets_calibration_file_and_block_settings(tmp_path):
    from phiedge.build.olive_config import calibration_file

    cfg = fill(catalog.load_recipe("cpu-gptq"), catalog.find_target("cpu"), tmp_path / "m", tmp_path,
               int4=Int4Settings(block_size=64, symmetric=False))
    assert cfg["data_configs"][0]["load_dataset_config"]["data_files"] == str(calibration_file(tmp_path))
    assert (cfg["passes"]["gptq"]["group_size"], cfg["passes"]["gptq"]["sym"]) == (64, False)
    assert list(cfg["passes"]) == ["gptq", "builder"]
