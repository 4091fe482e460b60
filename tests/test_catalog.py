import json
import math

import pytest
import yaml

from phiedge import catalog
from phiedge.errors import ConfigError, NotFoundError
from phiedge.schema import Target

NAMES = ["phi-2", "phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini", "phi-3-medium", "phi-4", "phi-4-mini",
         "phi-4-mini-reasoning", "phi-4-reasoning", "phi-4-reasoning-plus"]


def test_every_data_file_loads():
    assert set(NAMES) <= set(catalog.variants())
    assert "cpu" in catalog.targets()
    assert "cpu" in catalog.recipes()
    assert {"phi3", "phi4-mini", "chatml-phi4"} <= set(catalog.chat_formats())


@pytest.mark.parametrize("name", NAMES)
def test_buildable_configs_load_in_transformers(name):
    from transformers import AutoConfig

    v = catalog.find_variant(name)
    cfg = dict(v.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert config.hidden_size == v.config["hidden_size"]
    hd = v.config["hidden_size"] // v.config["num_attention_heads"]
    rotary = int(hd * v.config.get("partial_rotary_factor", 1.0))
    assert (rotary // 2) % 8 == 0, "GroupQueryAttention needs rotary_dim/2 to be a multiple of 8"
    scaling = v.config.get("rope_scaling")
    if scaling:
        assert len(scaling["long_factor"]) == len(scaling["short_factor"]) == rotary // 2


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_configs(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    v = catalog.find_variant(name)
    cfg = dict(v.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert sum(math.prod(p.shape) for p in model.parameters()) == v.params


def test_published_shapes_of_key_variants():
    mini = catalog.find_variant("phi-4-mini").config
    assert (mini["hidden_size"], mini["num_attention_heads"], mini["num_key_value_heads"], mini["vocab_size"]) == \
        (3072, 24, 8, 200064)
    assert mini["partial_rotary_factor"] == 0.75 and mini["tie_word_embeddings"] is True
    assert mini["rope_scaling"]["type"] == "longrope"
    assert catalog.find_variant("phi-2").config["partial_rotary_factor"] == 0.4
    assert catalog.find_variant("phi-4").chat_format == "chatml-phi4"


def test_aliases_and_hub_ids_resolve():
    assert catalog.find_variant("microsoft/Phi-4-mini-instruct").name == "phi-4-mini"
    assert catalog.find_variant("PHI-4-MINI-INSTRUCT").name == "phi-4-mini"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(NotFoundError, match="known: .*phi-4-mini"):
        catalog.find_variant("phi-5")
    with pytest.raises(NotFoundError, match="known: android, android-npu, cpu, ios, snapdragon-npu, windows-dml"):
        catalog.find_target("tpu")


def test_unbuildable_variants_say_why():
    blocked = [v for v in catalog.variants().values() if not v.buildable]
    assert {v.name for v in blocked} >= {"phi-3-small-8k", "phi-3.5-moe", "phi-3.5-vision", "phi-4-multimodal",
                                         "phi-4-mini-flash-reasoning"}
    assert all(v.reason and v.config.get("architectures") for v in blocked)


def test_a_broken_folder_reports_every_problem(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "a", "execution_provider": "tpu"}))
    (tmp_path / "b.yaml").write_text("name: [unclosed")
    (tmp_path / "c.yaml").write_text("- a list")
    with pytest.raises(ConfigError) as exc:
        catalog.load_folder(tmp_path, Target)
    text = str(exc.value)
    assert "a.yaml" in text and "b.yaml" in text and "c.yaml" in text
    assert len(exc.value.problems) > 3  # a.yaml alone has several


def test_recipes_are_olive_configs():
    """Olive's own schema accepts every recipe once the model is filled in."""
    from olive.workflows.run.config import RunConfig

    for name in catalog.recipes():
        data = catalog.load_recipe(name)
        data["input_model"]["model_path"] = "some/local/folder"
        RunConfig.model_validate(data)


def test_a_target_is_added_by_adding_a_file(tmp_path, monkeypatch, runner):
    import shutil

    from phiedge.cli import cli

    shutil.copytree(catalog.data_dir("targets"), tmp_path / "targets")
    data = yaml.safe_load((tmp_path / "targets" / "android.yaml").read_text())
    (tmp_path / "targets" / "tablet.yaml").write_text(yaml.safe_dump(
        {**data, "name": "tablet", "description": "12 GB tablet", "device": {"ram_gb": 12, "budget": 0.6}}))
    original = catalog.data_dir
    monkeypatch.setattr(catalog, "data_dir", lambda kind: tmp_path / kind if kind == "targets" else original(kind))
    catalog.targets.cache_clear()
    try:
        assert catalog.find_target("tablet").device.ram_gb == 12
        shown = {t["name"]: t for t in json.loads(runner.invoke(cli, ["targets", "--json"]).output)}
        assert shown["tablet"]["ram_gb"] == 12 and shown["tablet"]["layout"] == "android"
    finally:
        catalog.targets.cache_clear()


def test_targets_for_each_platform():
    t = catalog.targets()
    assert (t["android"].execution_provider, t["android"].bundle.layout, t["android"].checks.numeric) == \
        ("cpu", "android", True)
    assert (t["ios"].execution_provider, t["ios"].bundle.layout) == ("cpu", "ios")
    dml = t["windows-dml"]
    assert (dml.execution_provider, dml.checks.operators, dml.checks.numeric) == ("dml", "dml", False)
    assert dml.bundle.requirements == ["onnxruntime-genai-directml"]
