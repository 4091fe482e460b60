import json

import click
import pytest

from phiedge.cli import cli


def all_commands():
    return [(name, cmd) for name, cmd in cli.commands.items()]


@pytest.mark.parametrize("name, cmd", all_commands())
def test_every_option_has_help(name, cmd):
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{name} --{param.name} has no help"


def test_the_error_boundary_is_the_group(runner):
    """A command added to the group gets the one-line errors, exit codes and SIGTERM cleanup without a decorator."""
    from phiedge.errors import NotEnforced

    @cli.command("raise-for-test")
    @click.argument("kind")
    def raise_for_test(kind):
        raise NotEnforced("nothing held") if kind == "enforced" else KeyboardInterrupt

    try:
        result = runner.invoke(cli, ["raise-for-test", "enforced"])
        assert result.exit_code == 3 and result.output.strip() == "Error: nothing held"
        result = runner.invoke(cli, ["raise-for-test", "interrupt"])
        assert result.exit_code == 130 and "interrupted; nothing was written" in result.output
    finally:
        del cli.commands["raise-for-test"]


def test_models_table_and_json(runner):
    table = runner.invoke(cli, ["models"])
    assert table.exit_code == 0 and "phi-4-mini" in table.output and "not yet:" in table.output
    data = json.loads(runner.invoke(cli, ["models", "--json"]).output)
    assert {"phi-2", "phi-4-reasoning-plus", "phi-3.5-moe"} <= {r["name"] for r in data}


def test_models_recommend(runner):
    result = runner.invoke(cli, ["models", "--recommend", "--ram", "8GB", "--task", "math", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["task"] == "math"
    assert runner.invoke(cli, ["models", "--recommend"]).exit_code == 2


def test_targets_lists_cpu(runner):
    result = runner.invoke(cli, ["targets", "--json"])
    assert result.exit_code == 0
    shown = {t["name"]: t for t in json.loads(result.output)}
    assert shown["cpu"]["precision"] == "int4" and shown["cpu"]["context_cap"] == 4096
    assert (shown["android"]["provider"], shown["android"]["ram_gb"], shown["android"]["context_cap"]) == ("cpu", 8, 2048)
    assert (shown["windows-dml"]["provider"], shown["windows-dml"]["validated_here"]) == ("dml", False)
    assert (shown["cpu"]["int4_method"], shown["cpu"]["table"], shown["windows-dml"]["table"]) == \
        ("stream", "shared", "float")
    assert (shown["cpu"]["quantizer"], shown["cpu"]["calibrate"], shown["cpu"]["lm_head_bits"]) == ("gptq", True, 8)
    table = runner.invoke(cli, ["targets"]).output
    assert "ram_gb" in table and "ios" in table and "int4_method" in table


def one_line_error(result):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("model, target, words", [
    ("{tmp}/missing", "cpu", "does not exist"),
    ("{tmp}", "cpu", "no config.json"),
    ("{llama}", "cpu", "not a Phi model"),
    ("{phi}", "tpu", "unknown target 'tpu'"),
])
def test_build_errors_are_one_line_and_write_nothing(runner, tmp_path, checkpoints, model, target, words):
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(checkpoints["phi-4-mini"], llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    model = model.format(tmp=empty, llama=llama, phi=checkpoints["phi-4-mini"])
    out = tmp_path / "out"
    line = one_line_error(runner.invoke(cli, ["build", "--target", target, "--model", model, "-o", str(out)]))
    assert words in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_int4_option_is_one_line(runner, checkpoints, tmp_path):
    line = one_line_error(runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-4-mini"],
                                              "-o", str(tmp_path / "o"), "--block-size", "7",
                                              "--context-cap", "0"]))
    assert "block_size" in line and "context cap" in line


def test_dry_run_prints_the_olive_config_and_writes_nothing(runner, checkpoints, tmp_path):
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-4-mini"], "--dry-run",
                                 "--block-size", "128", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    assert config["passes"]["builder"]["int4_block_size"] == 128
    # method stream: the builder reads the checkpoint phiedge quantizes into the work folder
    assert config["input_model"]["model_path"] == "<workdir>/quantized"
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-4-mini"], "--dry-run",
                                 "--int4-method", "builder"])
    assert json.loads(result.output)["input_model"]["model_path"].endswith("phi-4-mini")


def test_build_through_the_cli(runner, checkpoints, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(cli, ["build", "--target", "cpu", "--model", checkpoints["phi-3-mini-4k"], "-o", str(out),
                                 "--context-cap", "1024", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    runtime = dict(record["runtime"])
    generation = runtime.pop("generation")  # the checkpoint's generation_config.json, as written
    assert runtime == {"max_length": 1024, "context_length": 4096, "intra_op_num_threads": 1}
    written = json.loads((out / "genai_config.json").read_text())["model"]
    assert generation["eos_token_id"] == written["eos_token_id"] and len(generation["eos_token_id"]) == 3  # <|end|>, <|assistant|>, <|endoftext|>
    saved = json.loads((out / "phiedge_build.json").read_text())  # the same, less what is true of one run only
    assert "build_seconds" in record and "path" in record["source"]
    assert saved == {**{k: v for k, v in record.items() if k != "build_seconds"},
                     "source": {k: v for k, v in record["source"].items() if k != "path"}}


def test_synth_through_the_cli(runner, tmp_path):
    result = runner.invoke(cli, ["synth", "--like", "phi-2", "-o", str(tmp_path / "s"), "--layers", "1",
                                 "--heads", "2", "--vocab", "1024"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["like"] == "phi-2"
    again = runner.invoke(cli, ["synth", "--like", "phi-2", "-o", str(tmp_path / "s")])
    assert "already exists" in one_line_error(again)
