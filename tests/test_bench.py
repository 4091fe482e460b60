import json

import pytest

from phiedge.bench import measure as bench_module
from phiedge.bench.measure import BenchError, BenchTest, bench, plan_tests, run_tg
from phiedge.bundle.generate import load
from phiedge.cli import cli

LLAMA_BENCH_FIELDS = {"n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
                      "samples_ts", "n_threads", "model_size", "model_n_params", "cpu_info", "test_time"}
PHIEDGE_FIELDS = {"ttft_ms", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "peak_rss_bytes", "provider",
                  "model_precision", "model_int4", "model_variant", "model_shape", "phiedge_version",
                  "onnxruntime_version", "onnxruntime_genai_version", "n_cores", "os"}


def test_plan_names_tests_like_llama_bench():
    assert [t.name for t in plan_tests([128, 512], [128], [0, 1024])] == ["pp128", "pp512", "tg128", "tg128 @ d1024"]
    with pytest.raises(BenchError, match="positive"):
        plan_tests([0], [128], [0])


def test_tg_n_times_n_decode_forward_passes(builds, monkeypatch):
    """llama-bench's tg N is N single-token forward passes. Every sampled token but the first (from the
    prefill's logits) needs a forward pass over the one before it, so N timed passes leave N + 1 sampled
    tokens after the context; timing from the first sample gives N tokens, N - 1 passes."""
    model, _ = load(str(builds("phi-4-mini", "int4")))
    made, real = [], bench_module.generator
    monkeypatch.setattr(bench_module, "generator", lambda *args: made.append(real(*args)) or made[-1])
    context = [5, 6, 7]
    for n_gen in (1, 6):
        steps = run_tg(model, context, n_gen)
        assert len(steps) == n_gen and all(s > 0 for s in steps)
        sequence = list(made[-1].get_sequence(0))
        assert sequence[:len(context)] == context
        assert len(sequence) - len(context) - 1 == n_gen  # tokens fed through a decode forward pass
    assert len(made) == 2


def test_records_carry_every_field(builds):
    records = bench(builds("phi-4-mini", "int4"), [BenchTest(16, 0), BenchTest(0, 8, 32)], reps=3, warmup=1)
    pp, tg = records
    for r in records:
        assert LLAMA_BENCH_FIELDS | PHIEDGE_FIELDS <= set(r)
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 3 and r["avg_ts"] > 0
        assert r["model_variant"] == "phi-4-mini" and r["model_precision"] == "int4" and r["n_threads"] >= 1
    assert (pp["n_prompt"], pp["n_gen"]) == (16, 0) and pp["ttft_ms"] > 0 and pp["latency_p50_ms"] is None
    assert (tg["n_prompt"], tg["n_gen"], tg["n_depth"]) == (0, 8, 32)
    assert tg["latency_p50_ms"] <= tg["latency_p90_ms"] <= tg["latency_p99_ms"]
    assert tg["avg_ts"] == pytest.approx(sum(tg["samples_ts"]) / 3, rel=1e-3)


def test_bad_input(builds, tmp_path):
    with pytest.raises(BenchError, match="neither a phiedge bundle nor a model folder"):
        bench(tmp_path, [BenchTest(8, 0)])
    with pytest.raises(BenchError, match="exceed the model's max_length"):
        bench(builds("phi-4-mini", "int4"), [BenchTest(5000, 0)])
    with pytest.raises(BenchError, match="repetitions"):
        bench(builds("phi-4-mini", "int4"), [BenchTest(8, 0)], reps=0)


def test_cli_formats_hold_the_same_numbers(runner, builds, tmp_path):
    args = ["bench", str(builds("phi-4-mini", "int4")), "-p", "16", "-n", "4", "-r", "2"]
    records = json.loads(runner.invoke(cli, [*args, "-o", "json"]).stdout)
    assert [r["test"] for r in records] == ["pp16", "tg4"]
    jsonl = runner.invoke(cli, [*args, "-o", "jsonl"]).stdout
    (tmp_path / "old.jsonl").write_text(jsonl)
    assert [json.loads(line)["test"] for line in jsonl.splitlines()] == ["pp16", "tg4"]
    result = runner.invoke(cli, [*args, "-o", "md", "--compare", str(tmp_path / "old.jsonl"),
                                 "--plot", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pp16 |" in result.stdout and "| tg4 |" in result.stdout
    assert "was" in result.stderr and "x)" in result.stderr
    bad = runner.invoke(cli, ["bench", str(tmp_path)])
    assert bad.exit_code == 1 and "neither a phiedge bundle" in bad.output and "Traceback" not in bad.output


def test_the_provider_is_the_one_genai_config_names(tmp_path):
    def named(decoder: dict) -> str:
        (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder}}))
        return bench_module.provider(tmp_path)

    assert named({"session_options": {"provider_options": [{"dml": {}}]}}) == "dml"
    assert named({"session_options": {}}) == named({}) == "cpu"
    assert named({"pipeline": [{"embeddings": {"filename": "e.onnx"}},  # an NPU build: its decoder models name it
                               {"iterator": {"filename": "i.onnx", "session_options": {
                                   "provider_options": [{"qnn": {"backend_type": "htp"}}]}}}]}) == "qnn"
