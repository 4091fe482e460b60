import pytest
from pydantic import ValidationError

from phiedge.schema import ChatFormat, Int4Settings, Recipe, Target, Variant

TARGET = dict(name="t", description="d", execution_provider="cpu", precision="int4", context_cap=4096, recipe="cpu")


def test_unknown_keys_are_rejected_everywhere():
    with pytest.raises(ValidationError, match="Extra inputs"):
        Target(**TARGET, contxt_cap=1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        Int4Settings(block=32)
    with pytest.raises(ValidationError, match="Extra inputs"):
        Variant(name="v", hf_id="x/y", family="f", params=1, summary="s", tasks=["chat"], license="MIT",
                buildable=False, reason="r", paramz=2)


@pytest.mark.parametrize("size", [7, 0, 512])
def test_block_size_must_be_a_power_of_two_in_range(size):
    with pytest.raises(ValidationError, match="block_size"):
        Int4Settings(block_size=size)


@pytest.mark.parametrize("settings, message", [
    ({"embeddings": "int8"}, "need method: stream"),
    ({"lm_head_bits": 8}, "need method: stream"),
    ({"quantizer": "mse"}, "quantizer mse, eight_bit, eight_bit_rows and calibrate need method: stream"),
    ({"eight_bit": ["model.layers.0.mlp.down_proj"]}, "eight_bit_rows and calibrate need method: stream"),
    ({"eight_bit_rows": 0.1}, "eight_bit_rows and calibrate need method: stream"),
    ({"method": "stream", "embeddings": "shared", "eight_bit_rows": 0.1}, "it needs embeddings shared, lm_head_bits 4"),
    ({"method": "stream", "eight_bit_rows": 1.0}, "eight_bit_rows"),
    ({"calibrate": True, "quantizer": "mse"}, "calibrate need method: stream"),
    ({"method": "stream", "calibrate": True}, "calibrate weights the quantizer: it needs quantizer mse or gptq"),
    ({"method": "stream", "quantizer": "gptq"}, "quantizer gptq needs calibrate"),
    ({"method": "stream", "quantizer": "awq"}, "quantizer"),
    ({"method": "stream", "algorithm": "k_quant_mixed"}, "method stream needs algorithm default"),
    ({"method": "stream", "float_nodes": ["/lm_head/MatMul"]}, "no float_nodes"),
    ({"method": "stream", "shared_embeddings": True}, "separate embeddings"),
    ({"embeddings": "int2"}, "embeddings"),
    ({"embeddings": "shared"}, "need method: stream"),
    ({"method": "stream", "embeddings": "shared", "symmetric": False}, "a shared 4-bit table must be symmetric"),
])
def test_int4_stream_settings_go_together(settings, message):
    with pytest.raises(ValidationError, match=message):
        Int4Settings(**settings)
    Int4Settings(method="stream", embeddings="int4", lm_head_bits=8, symmetric=False, quantizer="mse",
                 eight_bit=["model.layers.*.mlp.down_proj"], calibrate=True)  # all stream options at once
    Int4Settings(method="stream", quantizer="gptq", calibrate=True, symmetric=False)
    Int4Settings(method="stream", embeddings="shared", lm_head_bits=8, symmetric=False)  # 8-bit zero points fit


def test_target_values_are_checked():
    with pytest.raises(ValidationError):
        Target(**{**TARGET, "context_cap": 0})
    with pytest.raises(ValidationError):
        Target(**{**TARGET, "threads": 0})
    with pytest.raises(ValidationError):
        Target(**{**TARGET, "execution_provider": "tpu"})
    assert Target(**TARGET).threads == "auto"


def test_buildable_variant_needs_its_config_and_unbuildable_a_reason():
    base = dict(name="v", hf_id="x/y", family="f", params=1, summary="s", tasks=["chat"], license="MIT")
    with pytest.raises(ValidationError, match="lacks config keys"):
        Variant(**base, buildable=True, config={"architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ValidationError, match="must say why"):
        Variant(**base, buildable=False)


def test_chat_format_tokens_must_be_special():
    with pytest.raises(ValidationError, match="not among special_tokens"):
        ChatFormat(name="c", description="d", special_tokens=["<a>"], bos_token="<a>", eos_tokens=["<b>"],
                   pad_token="<a>", template="{{ x }}")


def test_recipe_needs_model_builder_and_no_accelerator():
    base = dict(input_model={"type": "HfModel"})
    with pytest.raises(ValidationError, match="ModelBuilder"):
        Recipe(**base, passes={"q": {"type": "OnnxQuantization"}})
    for key in ("systems", "host", "target"):  # the target's provider decides where the workflow runs
        with pytest.raises(ValidationError, match=f"{key}: the system and its accelerator are the target's"):
            Recipe(**base, **{key: "s"}, passes={"b": {"type": "ModelBuilder"}})
    Recipe(**base, passes={"b": {"type": "ModelBuilder", "precision": "int4"}})


def test_recipes_carry_no_int4_settings():
    """They are the target's (and the options'): a recipe's would be overwritten, and read as if they counted."""
    base = dict(input_model={"type": "HfModel"})
    with pytest.raises(ValidationError, match="b.int4_block_size: int4 settings belong to the target"):
        Recipe(**base, passes={"b": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 32}})


def test_one_provider_table_names_every_provider_a_target_may_use():
    from typing import get_args

    from phiedge.schema import PROVIDERS

    assert set(PROVIDERS) == set(get_args(Target.model_fields["execution_provider"].annotation))
    assert all(set(p.precisions) <= set(get_args(Target.model_fields["precision"].annotation))
               for p in PROVIDERS.values())


def test_runs_here_is_the_targets_numeric_check():
    from phiedge import catalog

    assert catalog.find_target("cpu").runs_here and catalog.find_target("android").runs_here
    assert not catalog.find_target("windows-dml").runs_here


def test_builder_boolean_options_must_be_booleans():
    """Olive passes extra_options to the builder unparsed: the string "false" would mean true there."""
    base = dict(input_model={"type": "HfModel"})
    with pytest.raises(ValidationError, match="hf_remote must be true or false, not 'false'"):
        Recipe(**base, passes={"b": {"type": "ModelBuilder", "extra_options": {"hf_remote": "false"}}})
    Recipe(**base, passes={"b": {"type": "ModelBuilder", "extra_options": {"hf_remote": False, "hf_token": "false"}}})


# Property-based: whatever a target or recipe file holds, parsing gives a model or one ConfigError listing
# problems, never another exception.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from phiedge.catalog import parse
from phiedge.errors import ConfigError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
TARGET_KEYS = list(Target.model_fields) + ["contxt_cap", ""]
RECIPE_KEYS = list(Recipe.model_fields) + ["pass", "extra"]


def near(base: dict, keys: list[str]):
    """The base document with some keys replaced by arbitrary JSON values, some removed, some added."""
    return st.dictionaries(st.sampled_from(keys), JSON, max_size=4).flatmap(
        lambda changes: st.sets(st.sampled_from(list(base)), max_size=2).map(
            lambda dropped: {**{k: v for k, v in base.items() if k not in dropped}, **changes}))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(near({**TARGET, "int4": {"block_size": 32}, "device": {"ram_gb": 8},
             "checks": {"max_opset": 21, "operators": "cpu", "numeric": True}}, TARGET_KEYS))
def test_target_parser_never_crashes(data):
    try:
        parse(Target, data, "t.yaml")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


RECIPE = dict(input_model={"type": "HfModel"}, passes={"b": {"type": "ModelBuilder", "extra_options": {"hf_remote": False}}})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(near(RECIPE, RECIPE_KEYS))
def test_recipe_parser_never_crashes(data):
    try:
        parse(Recipe, data, "r.yaml")
    except ConfigError as exc:
        assert exc.problems


@settings(max_examples=100, deadline=None)
@given(JSON)
def test_builder_extra_options_of_any_shape(extra):
    try:
        parse(Recipe, {**RECIPE, "passes": {"b": {"type": "ModelBuilder", "extra_options": extra}}}, "r.yaml")
    except ConfigError as exc:
        assert exc.problems
