"""`phiedge validate`: does the built model still behave like the original checkpoint?

Both run on the same token ids: the built model in onnxruntime-genai, the checkpoint in transformers
(PyTorch, fp32). Measured: greedy agreement on prompts; over every position of an evaluation text,
KL(reference || built) of the next-token distributions (mean, 99th percentile), top-1 agreement and
the change in the probability of the correct token; the perplexity of both; the size on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from phiedge import catalog
from phiedge.artifacts import GENAI_CONFIG, REPORT, ModelFolder
from phiedge.bundle import model_safety
from phiedge.bundle.generate import load_adapter, search_length
from phiedge.catalog import pydantic_problems
from phiedge.checkpoints import corpus, hub, lora, tokenizer_files
from phiedge.checkpoints.checkpoint import synth_record
from phiedge.checkpoints.fp32 import load_reference
from phiedge.checkpoints.locate import locate
from phiedge.checks import dequantized
from phiedge.checks.greedy import PROMPTS, greedy_metrics
from phiedge.errors import ConfigError, ModelError, NotEnforced, ValidationFailed
from phiedge.schema import (
    DequantizedSettings,
    Int4Settings,
    Thresholds,
    ValidationSettings,
)

__all__ = ["REPORT", "validate", "validate_build"]
ROWS_PER_CHUNK = 64  # softmax over a 200k vocabulary, 64 positions at a time, in float64


@dataclass
class Sums:
    """Running sums over positions, so windows never need to be held together."""

    kl: list
    top1: int = 0
    prob_change: float = 0.0
    nll_ref: float = 0.0
    nll_built: float = 0.0
    n: int = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def accumulate(sums: Sums, ref_logits: np.ndarray, built_logits: np.ndarray, targets: np.ndarray) -> None:
    """Add one window's positions: logits [T, V] of each model, targets [T] (the next token ids)."""
    for start in range(0, len(targets), ROWS_PER_CHUNK):
        sl = slice(start, start + ROWS_PER_CHUNK)
        lp, lq = log_softmax(ref_logits[sl]), log_softmax(built_logits[sl])
        p = np.exp(lp)
        sums.kl.extend(np.maximum((p * (lp - lq)).sum(axis=-1), 0.0).tolist())
        sums.top1 += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        rows = np.arange(lp.shape[0])
        t = targets[sl]
        sums.prob_change += float((np.exp(lq[rows, t]) - p[rows, t]).sum())
        sums.nll_ref -= float(lp[rows, t].sum())
        sums.nll_built -= float(lq[rows, t].sum())
        sums.n += len(t)


def logits_every_position(folder: ModelFolder) -> bool:
    """Whether the graph gives logits for every input position, or for the last one only (the builder's
    prune_lm_head, phiedge's default: its logits output is [batch, 1, vocab])."""
    if folder.stages:  # a pipeline's LM head gives logits for every position of the window
        return True
    graph = folder.graph.graph
    logits = next(o for o in graph.output if o.name == "logits")
    return logits.type.tensor_type.shape.dim[1].dim_value != 1


def built_logits(model, ids: list[int], every_position: bool, adapter=None) -> np.ndarray:
    """Logits at every position of the ids, [T, V]: from one prefill, or, for a graph that gives the last
    position's only, with the ids fed one at a time as decoding feeds them. `adapter`: a LoRA adapter to run
    with (generate.load_adapter's)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(**search_length(model, len(ids) + 1))
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    if every_position:
        generator.append_tokens(ids)  # a static model pads the ids to its window: its logits for the ids come first
        return np.asarray(generator.get_output("logits"))[0][:len(ids)]
    rows = []
    for token in ids:
        generator.append_tokens([token])
        logits = np.asarray(generator.get_logits())
        rows.append(logits.reshape(-1, logits.shape[-1])[-1])
    return np.stack(rows)


def distribution_metrics(model, reference, ids: list[int], window: int, every_position: bool, adapter=None) -> dict:
    import torch

    sums = Sums(kl=[])
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        inputs, targets = chunk[:-1], np.array(chunk[1:])
        with torch.no_grad():
            ref = reference(torch.tensor([inputs])).logits[0].numpy()
        out = built_logits(model, inputs, every_position, adapter)
        if out.shape[0] != ref.shape[0]:
            raise ValidationFailed(f"the built model gave logits for {out.shape[0]} positions, expected {ref.shape[0]}")
        if out.shape[-1] != ref.shape[-1]:  # both are the config's vocab_size (padded past the tokenizer's in Phi-3)
            raise ValidationFailed(f"the built model's logits are {out.shape[-1]} wide, the reference's "
                                   f"{ref.shape[-1]}: not the same vocabulary")
        accumulate(sums, ref, out, targets)
    kl = np.array(sums.kl)
    ppl_ref, ppl_built = float(np.exp(sums.nll_ref / sums.n)), float(np.exp(sums.nll_built / sums.n))
    return {"positions": sums.n, "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()), "top1": sums.top1 / sums.n,
            "correct_token_prob_change": sums.prob_change / sums.n,
            "perplexity_reference": ppl_ref, "perplexity_built": ppl_built, "ppl_ratio": ppl_built / ppl_ref}


def check(metrics: dict, limits: Thresholds) -> list[str]:
    """Each crossed threshold as a sentence that says which metric and by how much."""
    failures = []
    for name, value in limits.model_dump().items():
        if value is None:
            continue
        got = metrics[name]
        if name in Thresholds.MINIMA and got < value:
            failures.append(f"{name} {got:.4g} is below the minimum {value:.4g}")
        elif name not in Thresholds.MINIMA and got > value:
            failures.append(f"{name} {got:.4g} exceeds the maximum {value:.4g} ({got / value:.2g}x)")
    return failures


def with_overrides(settings: ValidationSettings, precision: str, overrides: dict) -> ValidationSettings:
    """The target's validation settings with some thresholds of this precision replaced (names starting
    `dequantized.`: the check against the dequantized reference).

    Raises pydantic's ValidationError for an unknown name or a value out of range.
    """
    prefix = "dequantized."
    dq = {k[len(prefix):]: v for k, v in overrides.items() if k.startswith(prefix)}
    own = {k: v for k, v in overrides.items() if not k.startswith(prefix)}
    limits = Thresholds(**{**settings.thresholds.get(precision, Thresholds()).model_dump(), **own})
    dequantized = DequantizedSettings(**{**settings.dequantized.model_dump(), **dq})
    return settings.model_copy(update={"thresholds": {**settings.thresholds, precision: limits},
                                       "dequantized": dequantized})


def random_weights(reference_dir: Path) -> bool:
    """Whether the reference holds the random weights phiedge synth wrote, checked against their digests."""
    record = synth_record(reference_dir)
    return record is not None and "trained" not in record


def enforcement(precision: str, limits: Thresholds | None, reference_dir: Path, target: str | None) -> str | None:
    """Why the thresholds are not enforced, or None when they are."""
    if limits is None or all(v is None for v in limits.model_dump().values()):
        return f"no thresholds for {precision} on target {target or '(none)'}: nothing was enforced"
    # On random weights every next-token distribution is nearly flat: quantization flips the argmax
    # at will and its error says nothing. An export must still be exact, so fp32 is always enforced.
    if precision != "fp32" and random_weights(reference_dir):
        return "random-weight reference: quantized-model thresholds not enforced"
    return None


def validate(built_dir: str | Path | ModelFolder, reference_dir: str | Path, precision: str, settings: ValidationSettings,
             eval_ids: list[int] | None = None, target: str | None = None,
             int4: Int4Settings | dict | None = None, adapter: tuple[str, Path] | None = None) -> dict:
    """Measure, compare with the thresholds for this precision, and return the report. `int4`: how the
    build quantized its weights (the build record's), for the comparison with the dequantized reference.
    `adapter` (name, PEFT folder): the built model runs with its LoRA adapter of that name active, the
    references (the checkpoint, the dequantized one) with the PEFT folder applied by PEFT.

    `enforced` says whether the thresholds against the original were held (`note` says why not); the
    dequantized check, where it applies, always is. `passed` is false when an enforced check failed, true
    when at least one check was enforced and all enforced ones were met, and null when nothing was
    enforced: never true for what was not checked.
    """
    folder = built_dir if isinstance(built_dir, ModelFolder) else ModelFolder(built_dir)
    built_dir, reference_dir = folder.path, Path(reference_dir)
    if dequantized.not_applicable(precision, int4) is None:
        dequantized.digests_of(folder)  # a missing or unreadable digest file fails before anything is measured
    model, _ = model_safety.load(built_dir)
    active = load_adapter(model, str(built_dir), adapter[0]) if adapter else None
    reference = load_reference(reference_dir, adapter=adapter[1] if adapter else None)
    tokenizer = tokenizer_files.load(reference_dir)
    ids = eval_ids if eval_ids is not None else corpus.eval_ids(reference_dir, settings.eval_tokens)
    max_length = folder.config["search"]["max_length"]
    window = min(settings.window, max_length - 1)  # the KV cache holds max_length tokens
    every = logits_every_position(folder)
    metrics = {**greedy_metrics(model, reference, tokenizer, PROMPTS, settings.greedy_tokens, active),
               **distribution_metrics(model, reference, ids, window, every, active)}
    del reference  # the dequantized reference takes its place in memory
    against = dequantized.compare(lambda x: built_logits(model, x, every, active), folder, reference_dir, precision,
                                  int4, settings.dequantized, ids, window, adapter[1] if adapter else None)
    limits = settings.thresholds.get(precision)
    failures = check(metrics, limits) if limits is not None else []
    note = enforcement(precision, limits, reference_dir, target)
    held = note is None or against["applies"]
    failed = (failures if note is None else []) + against["failures"]
    return {
        "built": str(built_dir), "reference": str(reference_dir), "precision": precision, "target": target,
        "adapter": adapter and {"name": adapter[0], "peft": str(adapter[1])},
        "size_bytes": folder.size_bytes(),
        "metrics": metrics, "thresholds": (limits or Thresholds()).model_dump(), "failures": failures,
        "enforced": note is None, "dequantized": against,
        "passed": False if failed else (True if held else None), "note": note,
    }


def enforced_failures(report: dict) -> list[str]:
    """What fails the build: the thresholds against the original where they are enforced, and the check
    against the dequantized reference on every checkpoint."""
    return (report["failures"] if report["enforced"] else []) + report["dequantized"]["failures"]


def raise_on_failure(report: dict) -> None:
    failures = enforced_failures(report)
    if failures:
        raise ValidationFailed(f"{report['built']} fails validation ({report['precision']}): " + "; ".join(failures))


def raise_unless_enforced(report: dict) -> None:
    """For `phiedge validate`: a run that held nothing to a threshold must not exit as if it passed."""
    if report["passed"] is None:
        raise NotEnforced(f"{report['built']}: validation not enforced ({report['note']})")


def validate_build(built_dir: str | Path, reference_dir: str | Path, target_name: str | None = None,
                   precision: str | None = None, overrides: dict | None = None,
                   text_file: str | Path | None = None, adapter: str | None = None) -> dict:
    """Validate a folder written by `phiedge build`, with its target's settings unless told otherwise. A reference
    named by the hub id the build came from is taken at the build's commit. `adapter`: with that LoRA adapter
    active, against the checkpoint with the PEFT folder the build made it from."""
    folder = ModelFolder(built_dir)
    if not (folder.path / GENAI_CONFIG).is_file():
        raise ModelError(f"{folder.path} is not a built model folder (no {GENAI_CONFIG})")
    record = folder.record
    under_test = None
    if adapter is not None:
        entries = {a.name: a for a in (record.adapters if record else [])}
        if adapter not in entries:
            raise ModelError(f"{folder.path} has no adapter {adapter!r}: it has {', '.join(entries) or 'none'}")
        under_test = (adapter, Path(entries[adapter].source))
    fetched = record.source.hub if record else None  # a reference by hub id: the commit the build was made from
    same = fetched is not None and hub.hub_id(str(reference_dir)) == fetched.repo_id
    checkpoint = locate(reference_dir, fetched.commit if same else None)
    reference_dir = checkpoint.path
    if under_test is not None:  # the PEFT folder held to a build's checks (never a pickle) before PEFT reads it
        under_test = (adapter, lora.read(adapter, under_test[1], checkpoint.config).path)
    target = catalog.find_target(target_name or (record.target if record else "cpu"))
    precision = precision or (record.precision if record else None) or target.precision
    try:
        settings = with_overrides(target.validation, precision, overrides or {})
    except ValidationError as exc:
        raise ConfigError("--threshold", pydantic_problems(exc)) from None
    ids = None
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--text", [f"cannot read {text_file}: {exc.strerror}"]) from None
        ids = tokenizer_files.load(reference_dir)(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 16:
            raise ConfigError("--text", [f"{text_file} has {len(ids)} tokens; at least 16 are needed"])
        ids = ids[:settings.eval_tokens]
    return validate(folder, reference_dir, precision, settings, ids, target.name, record and record.int4, under_test)


def summary_lines(report: dict) -> list[str]:
    m = report["metrics"]
    failed = enforced_failures(report)
    unenforced = "" if report["enforced"] or not report["failures"] else ": " + "; ".join(report["failures"])
    verdict = {True: "PASS", False: "FAIL", None: "NOT ENFORCED"}[report["passed"]]
    return [
        f"built      {report['built']} ({report['precision']}, {report['size_bytes'] / 1e6:.1f} MB)",
        f"greedy     {sum(r['identical'] for r in m['prompts'])}/{len(m['prompts'])} prompts identical; "
        f"agreeing tokens {[r['agree'] for r in m['prompts']]} of {m['prompts'][0]['of']}",
        f"KL         mean {m['kl_mean']:.3g}, p99 {m['kl_p99']:.3g}, max {m['kl_max']:.3g} over {m['positions']} positions",
        f"top-1      {m['top1']:.4f}; correct-token probability change {m['correct_token_prob_change']:+.3g}",
        f"perplexity reference {m['perplexity_reference']:.3f}, built {m['perplexity_built']:.3f}, "
        f"ratio {m['ppl_ratio']:.4f}",
        dequantized.summary_line(report["dequantized"]),
        f"verdict    {verdict}" + (": " + "; ".join(failed) if failed else "")
        + (f" ({report['note']}{unenforced})" if report["note"] else ""),
    ]
