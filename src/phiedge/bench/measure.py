"""`phiedge bench`: prompt-processing and generation speed of a model folder or bundle, llama-bench style.

pp tests time one prefill of n_prompt random tokens; tg tests time n_gen single-token decode steps
after a context of n_depth tokens (decode slows as the KV cache grows). Each test: warm-up runs, then
repetitions; every sample kept. Timings exclude tokenization: prompts are token ids.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from phiedge import __version__
from phiedge.artifacts import ModelFolder, Opened
from phiedge.bundle import model_safety
from phiedge.bundle.generate import adapter_files, load_adapter, prompt_window, providers, search_length
from phiedge.errors import BenchError
from phiedge.schema import PROVIDERS


@dataclass(frozen=True)
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int = 0

    @property
    def name(self) -> str:
        base = f"pp{self.n_prompt}" if self.n_gen == 0 else f"tg{self.n_gen}"
        return base + (f" @ d{self.n_depth}" if self.n_depth else "")


def plan_tests(prompts: list[int], gens: list[int], depths: list[int]) -> list[BenchTest]:
    bad = [n for n in [*prompts, *gens] if n < 1] + [d for d in depths if d < 0]
    if bad:
        raise BenchError(f"token counts must be positive (depths non-negative), got {bad}")
    return [BenchTest(p, 0) for p in prompts] + [BenchTest(0, g, d) for d in depths for g in gens]


def cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def generator(model, max_length: int, adapter=None):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(**search_length(model, max_length), min_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:  # (og.Adapters, name): that LoRA adapter active
        gen.set_active_adapter(*adapter)
    return gen


def run_pp(model, ids: list[int], adapter=None) -> tuple[float, float]:
    """(prefill seconds, time to first token seconds) for one prompt."""
    gen = generator(model, len(ids) + 2, adapter)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    t1 = time.perf_counter()
    gen.generate_next_token()
    gen.get_next_tokens()
    return t1 - t0, time.perf_counter() - t0


def run_tg(model, context: list[int], n_gen: int, adapter=None) -> list[float]:
    """Seconds of each of n_gen decode steps after the context (not timed), each one forward pass of one token.

    That is llama-bench's tg N. append_tokens runs the context's forward pass and leaves its logits, so the
    first generate_next_token only samples from them; n_gen timed calls after it feed n_gen tokens through
    the model (timing the first call instead would count n_gen - 1 passes as n_gen tokens).
    """
    gen = generator(model, len(context) + n_gen + 1, adapter)
    gen.append_tokens(context)
    gen.generate_next_token()  # the token after the context, from the prefill's logits: no forward pass
    latencies = []
    for _ in range(n_gen):
        t = time.perf_counter()
        gen.generate_next_token()
        gen.get_next_tokens()
        latencies.append(time.perf_counter() - t)
    return latencies


def model_info(bundle: Opened) -> tuple[ModelFolder, dict]:
    """(model folder, what is known of the model) from a bundle's manifest or a build record."""
    if not bundle.is_bundle and not bundle.is_model_folder:
        raise BenchError(bundle.neither())
    if bundle.is_bundle:
        manifest = bundle.manifest
        return bundle.folder, {**(manifest.model or {}), "target": manifest.target}
    r = bundle.folder.record
    if r is not None:
        return bundle.folder, {"variant": r.source.variant, "params": r.source.params,
                               "precision": r.precision, "int4": r.int4, "target": r.target}
    return bundle.folder, {}


def provider(model_dir: Path) -> str:
    """The execution provider the model runs on: the one genai_config.json names (a pipeline's too), or the CPU."""
    named = providers(str(model_dir))
    return next((key for key, p in PROVIDERS.items() if p.genai is not None and p.genai in named), "cpu")


def bench(root: str | Path | Opened, tests: list[BenchTest], reps: int = 5, warmup: int = 1, threads: int | None = None,
          progress=None, adapters: list[str] = ()) -> list[dict]:
    """One record per test, with llama-bench's field names where one exists. With `adapters` (LoRA adapter names),
    one record per test for the base and for each adapter active, their runs interleaved repetition by repetition."""
    from importlib.metadata import version

    if reps < 1 or warmup < 0:
        raise BenchError(f"repetitions must be at least 1 and warm-up at least 0 (got -r {reps}, warm-up {warmup})")
    folder, info = model_info(root if isinstance(root, Opened) else Opened(Path(root)))
    model_dir, config = folder.path, folder.config
    decoder, cap = folder.decoder, config["search"]["max_length"]
    too_long = [t.name for t in tests if max(t.n_prompt, t.n_depth + t.n_gen) + 2 > cap]
    if too_long:
        raise BenchError(f"tests {', '.join(too_long)} exceed the model's max_length {cap}")
    window = prompt_window(str(model_dir))
    too_wide = [t.name for t in tests if window is not None and max(t.n_prompt, t.n_depth) > window]
    if too_wide:
        raise BenchError(f"tests {', '.join(too_wide)} have prompts over this NPU model's static window ({window} "
                         "tokens)")
    model, _ = model_safety.load(model_dir, threads)
    known = adapter_files(str(model_dir))
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise BenchError(f"no adapter {unknown[0]!r} in {model_dir}: it has {', '.join(known) or 'none'}")
    loaded, load_seconds = {None: None}, {}
    for name in adapters:
        start = time.perf_counter()
        loaded[name] = load_adapter(model, str(model_dir), name)
        load_seconds[name] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    vocab = min(config["model"]["vocab_size"], 1000)  # ordinary tokens: ids below any special token
    base = {"phiedge_version": __version__, "onnxruntime_genai_version": version("onnxruntime-genai"),
            "onnxruntime_version": version("onnxruntime"), "cpu_info": cpu_info(), "n_cores": os.cpu_count(),
            "os": platform.platform(), "provider": provider(model_dir),
            "n_threads": threads or decoder.get("session_options", {}).get("intra_op_num_threads"),
            "model_variant": info.get("variant"), "model_precision": info.get("precision"),
            "model_int4": info.get("int4"), "model_n_params": info.get("params"),
            "model_size": folder.size_bytes(),
            "model_shape": {k: decoder[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_size")}}
    records = []
    for test in tests:
        if progress:
            progress(test.name)
        ids = rng.integers(0, vocab, max(test.n_prompt, test.n_depth) or 1).tolist()
        runs = {name: ([], [], []) for name in loaded}  # adapter -> (samples, ttft, latencies)
        for i in range(warmup + reps):
            for name, adapter in loaded.items():  # interleaved: base, then each adapter, every repetition
                samples, ttft, latencies = runs[name]
                if test.n_gen == 0:
                    seconds, first = run_pp(model, ids[:test.n_prompt], adapter)
                else:
                    steps = run_tg(model, ids[:max(test.n_depth, 1)], test.n_gen, adapter)
                    seconds, first = sum(steps), None
                if i < warmup:
                    continue
                samples.append(seconds)
                if first is not None:
                    ttft.append(first)
                else:
                    latencies += steps
        tokens = test.n_prompt if test.n_gen == 0 else test.n_gen
        for name, (samples, ttft, latencies) in runs.items():
            records.append(test_record(base, test, reps, tokens, samples, ttft, latencies, name,
                                       load_seconds.get(name)))
    return records


def test_record(base: dict, test: BenchTest, reps: int, tokens: int, samples: list[float], ttft: list[float],
                latencies: list[float], adapter: str | None, adapter_load_s: float | None) -> dict:
    """One test's record (for the base, or with `adapter` active: its load time beside it)."""
    ts = [tokens / s for s in samples]
    record = {**base, "test": test.name, "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth,
              "adapter": adapter, "adapter_load_ms": None if adapter_load_s is None else round(adapter_load_s * 1e3, 2),
              "test_time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repetitions": reps,
              "samples_ns": [int(s * 1e9) for s in samples], "avg_ns": int(statistics.mean(samples) * 1e9),
              "stddev_ns": int(statistics.stdev(samples) * 1e9) if reps > 1 else 0,
              "samples_ts": [round(t, 3) for t in ts], "avg_ts": statistics.mean(ts),
              "stddev_ts": statistics.stdev(ts) if reps > 1 else 0.0,
              "ttft_ms": statistics.mean(ttft) * 1e3 if ttft else None,
              "latency_p50_ms": None, "latency_p90_ms": None, "latency_p99_ms": None,
              "peak_rss_bytes": peak_rss_bytes()}
    if latencies:
        p50, p90, p99 = np.percentile(np.array(latencies) * 1e3, [50, 90, 99])
        record.update(latency_p50_ms=float(p50), latency_p90_ms=float(p90), latency_p99_ms=float(p99))
    return record
