from phiedge.cli import cli
from phiedge.telemetry import OPT_OUT, opt_out


def test_opt_out_respects_a_users_choice():
    env = opt_out({"ORT_DISABLE_TELEMETRY": "0"})
    assert env["ORT_DISABLE_TELEMETRY"] == "0"
    assert all(env[k] == v for k, v in OPT_OUT.items() if k != "ORT_DISABLE_TELEMETRY")


def test_every_cli_run_opts_out(runner, monkeypatch):
    import os

    for key in OPT_OUT:
        monkeypatch.delenv(key, raising=False)
    assert runner.invoke(cli, ["targets"]).exit_code == 0
    assert all(os.environ.get(k) == v for k, v in OPT_OUT.items())
