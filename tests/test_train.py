import json

from phiedge.checkpoints.checkpoint import inspect
from phiedge.checkpoints.corpus import eval_ids
from phiedge.cli import cli


def test_trained_model_is_sharp_and_recorded(trained):
    record = json.loads((inspect(trained).path / "phiedge_synth.json").read_text())["trained"]
    # far below the uniform perplexity of its vocabulary: the distributions are sharp
    assert record["held_out_perplexity"] < record["uniform_perplexity"] / 8
    assert record["final_train_loss"] < 6.0
    assert inspect(trained).variant == "phi-4-mini"


def test_eval_ids_are_deterministic(trained):
    assert eval_ids(trained, 300) == eval_ids(trained, 300) and len(eval_ids(trained, 300)) == 300


def test_train_cli_runs_and_refuses_zero_steps(runner, tmp_path):
    assert runner.invoke(cli, ["train", "-o", str(tmp_path / "m"), "--steps", "0"]).exit_code == 2
    result = runner.invoke(cli, ["train", "-o", str(tmp_path / "m"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trained"]["steps"] == 2
