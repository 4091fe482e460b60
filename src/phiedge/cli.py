"""The `phiedge` command: click wiring only. The one place phiedge errors become click errors."""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from phiedge import __version__, catalog, telemetry
from phiedge.artifacts import opened
from phiedge.bench.measure import bench, plan_tests
from phiedge.bench.plot import plot
from phiedge.bench.report import compare, render
from phiedge.build.plan import BuildOptions, plan
from phiedge.build.stages import build
from phiedge.bundle.generate import main as generate_main
from phiedge.bundle.model_safety import check_model_folder
from phiedge.bundle.package import archive_path, package
from phiedge.bundle.signing import keygen, load_public, load_secret
from phiedge.bundle.verify import verify, verify_dir
from phiedge.checkpoints import hub, lora
from phiedge.checkpoints.lora_train import train_lora
from phiedge.checkpoints.synth import Shrink
from phiedge.checkpoints.synth import synth as make_checkpoint
from phiedge.checkpoints.train import train as run_train
from phiedge.checks.validate import raise_on_failure, raise_unless_enforced, summary_lines, validate_build
from phiedge.demo import demo
from phiedge.errors import ModelError, PhiedgeError, Terminated
from phiedge.models import recommend as recommend_variant
from phiedge.models import rows as variant_rows
from phiedge.progress import Progress
from phiedge.release import index as release_index
from phiedge.release import release
from phiedge.schema import Int4Settings, Target, choices
from phiedge.serve.server import serve, served


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextmanager
def errors_to_click():
    """Turn phiedge's own exceptions into one-line errors with a non-zero exit, never a traceback."""
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        yield
    except PhiedgeError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = getattr(exc, "exit_code", error.exit_code)  # e.g. validate's 3: nothing enforced
        raise error from None
    except Terminated:
        click.echo("phiedge: terminated; nothing was written", err=True)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        click.echo("phiedge: interrupted; nothing was written", err=True)
        sys.exit(130)
    finally:
        if main_thread:  # None: a handler set outside Python, which the default stands for
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Phiedge(click.Group):
    """The one error boundary: every command, and any added later, runs inside errors_to_click."""

    def invoke(self, ctx: click.Context):
        with errors_to_click():
            return super().invoke(ctx)


def parse_thresholds(values: tuple[str, ...]) -> dict:
    """NAME=VALUE pairs from --threshold; names and ranges are checked by the schema."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected NAME=NUMBER, got {item!r}", param_hint="--threshold") from None
        if not sep:
            raise click.BadParameter(f"expected NAME=NUMBER, got {item!r}", param_hint="--threshold")
    return out


TRUST_HELP = ("Refuse the bundle unless its manifest is signed by this minisign public key (a .pub file or "
              "the RW... key line); also read from PHIEDGE_TRUST.")
MODEL_HELP = ("Hugging Face checkpoint: a folder, or a hub id (OWNER/NAME) or catalog name (`phiedge models`) "
              "fetched into the Hugging Face cache; the build record names the hub commit.")
THRESHOLD_HELP = ("Override a validation threshold, e.g. kl_mean=1e-3 (kl_mean, kl_p99, top1, ppl_ratio, greedy; "
                  "dequantized.logits_rel_rms for the check against the dequantized weights).")


def parse_adapter(spec: str) -> tuple[str, str]:
    try:
        name, folder = lora.parse_spec(spec)
    except ModelError as exc:
        raise click.BadParameter(str(exc).removeprefix("--adapter "), param_hint="--adapter") from None
    return name, str(folder)


def emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@click.group(cls=Phiedge)
@click.version_option(__version__, prog_name="phiedge")
def cli():
    """Phi models from a Hugging Face checkpoint to a validated int4 ONNX model for edge devices."""
    telemetry.opt_out()


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--recommend", is_flag=True, help="Pick one variant for a device's memory and a task.")
@click.option("--ram", default=None, help="Device memory for --recommend, e.g. 4GB.")
@click.option("--task", default=None, help="Use for --recommend, e.g. chat, code, math, reasoning.")
def models_command(as_json, recommend, ram, task):
    """List the Phi variants phiedge knows, or recommend one."""
    if recommend:
        if not ram:
            raise click.UsageError("--recommend needs --ram (e.g. --ram 4GB)")
        r = recommend_variant(ram, task)
        emit(r, as_json, f"{r['name']} ({r['hf_id']}): int4 weights {r['int4_weights_gb']} GB + KV cache "
                         f"{r['kv_cache_gb']} GB at {r['context']} tokens, {r['total_gb']} GB of a "
                         f"{r['ram_budget_gb']} GB budget. {r['why']}")
        return
    data = variant_rows()
    shown = [{**row, "tasks": ",".join(row["tasks"]),
              "status": "ok" if row["buildable"] else f"not yet: {row['reason']}"} for row in data]
    emit(data, as_json, table(shown, ["name", "hf_id", "params_b", "int4_gb", "context", "tasks", "status"]))


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets_command(as_json):
    """List the device targets found under targets/."""
    data = [{"name": t.name, "provider": t.execution_provider, "precision": t.precision,
             "block_size": t.int4.block_size, "accuracy_level": t.int4.accuracy_level,
             "int4_method": t.int4.method, "quantizer": t.int4.quantizer, "calibrate": t.int4.calibrate,
             "table": t.embedding_table, "lm_head_bits": t.int4.lm_head_bits, "eight_bit": t.int4.eight_bit,
             "context_cap": t.context_cap, "ram_gb": t.device.ram_gb if t.device else None,
             "threads": t.threads, "recipe": t.recipe, "layout": t.bundle.layout,
             "validated_here": t.runs_here,
             "description": t.description} for t in catalog.targets().values()]
    emit(data, as_json, table(data, ["name", "provider", "precision", "block_size", "int4_method", "quantizer",
                                     "calibrate", "table", "lm_head_bits", "context_cap", "ram_gb", "threads",
                                     "layout", "validated_here"]))


@cli.command("synth")
@click.option("--like", required=True, help="Variant whose architecture to copy, e.g. phi-4-mini.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the variant's).")
@click.option("--heads", type=int, default=None, help="Attention heads; hidden size = heads x head dim.")
@click.option("--kv-heads", type=int, default=None, help="Key/value heads (default keeps the GQA ratio).")
@click.option("--intermediate", type=int, default=None, help="MLP width (default: the variant's).")
@click.option("--vocab", type=int, default=None, help="Vocabulary (embedding rows; default: the variant's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True,
              help="Weight precision on disk (published Phi checkpoints are bf16).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def synth_command(like, out, layers, heads, kv_heads, intermediate, vocab, seed, dtype, force):
    """Write a Hugging Face checkpoint shaped like a Phi variant, with random weights."""
    progress = Progress()
    summary = make_checkpoint(like, out, Shrink(layers, heads, kv_heads, intermediate, vocab), seed=seed, dtype=dtype,
                   force=force, progress=progress.iterate)
    click.echo(json.dumps(summary, indent=2))


@cli.command("train")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--like", default="phi-4-mini", show_default=True, help="Variant whose architecture to copy.")
@click.option("--steps", type=int, default=None,
              help="Optimizer steps (a model: 600 of 16 x 128 tokens; --lora: 60 of 8 x 128).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights and batches.")
@click.option("--lora", "lora_base", type=click.Path(), default=None, metavar="CHECKPOINT",
              help="Train a PEFT LoRA adapter of this checkpoint instead (on --package), written to -o.")
@click.option("--package", default="email", show_default=True,
              help="--lora: the standard library package to fine-tune on (every 10th module held out).")
@click.option("--rank", type=int, default=8, show_default=True, help="--lora: the adapter's rank (lora_alpha 2x).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def train_command(out, like, steps, seed, lora_base, package, rank, force):
    """Train a small Phi-shaped model on the Python standard library (minutes on 2 cores), or a LoRA adapter
    of a checkpoint on one of its packages."""
    if steps is not None and steps < 1:
        raise click.BadParameter("must be at least 1", param_hint="--steps")
    if rank < 1:
        raise click.BadParameter("must be at least 1", param_hint="--rank")
    if lora_base is not None:
        result = train_lora(lora_base, out, package, rank=rank, alpha=2 * rank, steps=steps or 60, seed=seed,
                            force=force, progress=Progress().iterate)
    else:
        result = run_train(out, like, steps=steps or 600, seed=seed, force=force, progress=Progress().iterate)
    click.echo(json.dumps(result, indent=2))


@cli.command("build")
@click.option("--target", "target_name", default=None,
              help="Device target (see `phiedge targets`); several, comma-separated, make a release in -o.")
@click.option("--all-targets", is_flag=True, help="Build, validate and package every target into -o with an index.")
@click.option("--model", "model_dir", required=True, type=click.Path(), help=MODEL_HELP)
@click.option("--revision", default=None, help="Branch, tag or commit of a --model hub id (default: main).")
@click.option("-o", "--output", "out", type=click.Path(), default=None,
              help="Model folder to write (a release folder with several targets).")
@click.option("--precision", type=click.Choice(choices(Target, "precision")), default=None,
              help="Override the target's precision (fp32 checks the export apart from quantization).")
@click.option("--block-size", type=int, default=None, help="int4 block size (16, 32, 64, 128 or 256).")
@click.option("--accuracy-level", type=int, default=None, help="int4 MatMul compute: 1 fp32 .. 4 int8.")
@click.option("--symmetric/--asymmetric", default=None, help="int4 with or without zero points.")
@click.option("--algorithm", default=None,
              help="int4 algorithm: default, rtn, rtn_last, k_quant, k_quant_mixed, k_quant_last (*_last: 8-bit LM head).")
@click.option("--shared-embeddings/--separate-embeddings", default=None,
              help="Embedding table shares the quantized LM head, or stays separate (default: the builder's).")
@click.option("--float-node", "float_nodes", multiple=True, help="Keep this MatMul unquantized, e.g. /lm_head/MatMul.")
@click.option("--int4-method", type=click.Choice(choices(Int4Settings, "method")), default=None,
              help="stream: quantize matrix by matrix from the memory-mapped checkpoint (memory flat in model "
                   "size); builder: the builder quantizes its fp32 graph.")
@click.option("--embeddings", type=click.Choice(choices(Int4Settings, "embeddings")), default=None,
              help="Input embedding table: float, int8, int4, or shared: the LM head's quantized table at "
                   "--lm-head-bits, stored once (tied checkpoints). All but float need --int4-method stream.")
@click.option("--lm-head-bits", type=click.Choice(choices(Int4Settings, "lm_head_bits")), default=None, help="Bits of the LM head (8: stream).")
@click.option("--eight-bit-rows", type=float, default=None, metavar="SHARE",
              help="A shared 4-bit table (--embeddings shared --lm-head-bits 4, calibrated) with this share of its "
                   "rows, the tokens the checkpoint gives the most probability, at 8 bits, e.g. 0.1.")
@click.option("--quantizer", type=click.Choice(choices(Int4Settings, "quantizer")), default=None,
              help="How --int4-method stream rounds each matrix: rtn (round to nearest, ONNX Runtime's kernel), "
                   "mse (least squared error, never worse than rtn) or gptq (rounding errors compensated from the "
                   "calibration; needs --calibrate). Same size and speed.")
@click.option("--eight-bit", "eight_bit", multiple=True, metavar="PATTERN",
              help="Keep the layer matrices this pattern names at 8 bits (stream; repeatable), e.g. "
                   "'model.layers.*.mlp.down_proj'. Replaces the target's list.")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Weight the quantizer by each matrix's inputs over calibration text (--calibration FILE, default "
                   "stdlib source), collected one layer at a time; on an rtn target implies --quantizer mse, "
                   "--no-calibrate on a gptq target means mse.")
@click.option("--context-cap", type=int, default=None, help="Override the target's max_length (KV cache size).")
@click.option("--threads", type=int, default=None, help="Override intra-op threads in genai_config.json.")
@click.option("--recipe", default=None, help="Another Olive workflow under recipes/, e.g. cpu-gptq.")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration text for --calibrate and calibrated recipes (default: Python stdlib source).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PEFT_DIR",
              help="A PEFT LoRA adapter to build beside the model as NAME.onnx_adapter (repeatable; every adapter "
                   "must adapt the same matrices at the same rank), validated against transformers with PEFT.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison with the checkpoint in transformers.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE", help=THRESHOLD_HELP)
@click.option("--dry-run", is_flag=True, help="Print the Olive config that would run, and do nothing else.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--no-bench", is_flag=True, help="Releases: leave the short benchmark out of the index.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def build_command(target_name, all_targets, model_dir, revision, out, precision, block_size, accuracy_level,
                  symmetric, algorithm, shared_embeddings, float_nodes, int4_method, embeddings, lm_head_bits,
                  eight_bit_rows, quantizer, eight_bit, calibrate, context_cap, threads, recipe, calibration,
                  adapters, no_validate, thresholds, dry_run, no_bench, force, quiet):
    """Export and quantize a checkpoint for a target through its Olive recipe, then check the result."""
    if quiet:
        hub.quiet()
    int4 = {k: v for k, v in dict(block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric,
                                  algorithm=algorithm, shared_embeddings=shared_embeddings,
                                  float_nodes=list(float_nodes) or None, method=int4_method, embeddings=embeddings,
                                  lm_head_bits=lm_head_bits and int(lm_head_bits), eight_bit_rows=eight_bit_rows,
                                  quantizer=quantizer, calibrate=calibrate,
                                  eight_bit=list(eight_bit) or None).items() if v is not None}
    options = BuildOptions(precision=precision, int4=int4, context_cap=context_cap, threads=threads, recipe=recipe,
                           calibration=calibration, validate=not no_validate, thresholds=parse_thresholds(thresholds),
                           revision=revision, adapters=tuple(map(parse_adapter, adapters)))
    if bool(target_name) == all_targets:
        raise click.UsageError("Give --target NAME[,NAME...] or --all-targets.")
    names = None if all_targets else [t.strip() for t in target_name.split(",") if t.strip()]
    if names == []:
        raise click.UsageError(f"--target {target_name!r} names no target.")
    if dry_run:
        configs = {name: plan(model_dir, name, options).olive_config(Path("<workdir>"))
                   for name in names or catalog.targets()}
        click.echo(json.dumps(configs[names[0]] if names and len(names) == 1 else configs, indent=2))
        return
    if not out:
        raise click.UsageError("Missing option '-o' / '--output' (not needed with --dry-run).")
    if all_targets or len(names) > 1:
        index = release(model_dir, names, out, options, force=force, progress=Progress(quiet), run_bench=not no_bench)
        click.echo(json.dumps(index, indent=2))
        return
    record = build(model_dir, names[0], out, options, force=force, progress=Progress(quiet))
    click.echo(json.dumps(record, indent=2))


@cli.command("fetch")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Folder to fetch into (resumable).")
@click.option("--revision", default=None, help="Hub branch, tag or commit (default: main).")
def fetch_command(model, out, revision):
    """Fetch a checkpoint by hub id or catalog name into a folder: only what a build reads (safetensors, configs,
    tokenizer), resuming an interrupted fetch; HF_TOKEN for gated repositories."""
    click.echo(hub.fetch(model, Path(out), revision).model_dump_json(indent=2))


@cli.command("validate")
@click.argument("model_dir", type=click.Path())
@click.option("--reference", required=True, type=click.Path(),
              help="The original checkpoint: a folder, or a hub id or catalog name (fetched into the Hugging Face "
                   "cache; the build's own hub id at the build's commit).")
@click.option("--target", "target_name", default=None, help="Target whose thresholds apply (default: the build's).")
@click.option("--precision", type=click.Choice(choices(Target, "precision")), default=None,
              help="Precision whose thresholds apply (default: the build's).")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE", help=THRESHOLD_HELP)
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Evaluation text file (default: held-out Python standard library source).")
@click.option("--adapter", default=None, metavar="NAME",
              help="With the build's LoRA adapter NAME active, against the checkpoint with its PEFT folder applied.")
@click.option("--json", "json_file", type=click.Path(), default=None, help="Also write the full report here.")
def validate_command(model_dir, reference, target_name, precision, thresholds, text_file, adapter, json_file):
    """Compare a built model with its original checkpoint.

    Exit status: 0 when the target's thresholds for the precision were enforced and met; 1 when one was
    crossed or an input is wrong (2: a bad option); 3 when nothing was enforced, because the target has
    no thresholds for the precision or the reference holds phiedge synth's random weights and the build
    is quantized: the numbers are printed and the verdict says NOT ENFORCED, but nothing was checked.
    """
    report = validate_build(model_dir, reference, target_name, precision, parse_thresholds(thresholds), text_file,
                            adapter)
    if json_file:
        Path(json_file).write_text(json.dumps(report, indent=2) + "\n")
    click.echo("\n".join(summary_lines(report)))
    raise_on_failure(report)
    raise_unless_enforced(report)


@cli.command("package")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Archive (.zip) to write, or a folder to write NAME.zip into.")
@click.option("--force", is_flag=True, help="Replace the archive if it exists.")
@click.option("--sign", "sign_key", type=click.Path(), default=None,
              help="Sign the manifest with this minisign secret key (from `phiedge keygen` or `minisign -G -W`).")
def package_command(model_dir, out, force, sign_key):
    """Bundle a built model folder into a release archive with a manifest and a generation program."""
    key = load_secret(sign_key) if sign_key else None
    manifest = package(model_dir, out, force=force, sign=key)
    written = archive_path(out, manifest["name"])  # a folder stays a folder; a file path is the archive
    click.echo(json.dumps({"archive": str(written), "name": manifest["name"], "files": len(manifest["files"]),
                           "signed_by": key and key.id}, indent=2))


@cli.command("keygen")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Key pair to write: OUT.key (secret, mode 0600) and OUT.pub (public).")
@click.option("--force", is_flag=True, help="Replace the key files if they exist.")
def keygen_command(out, force):
    """Make a minisign-compatible Ed25519 key pair for `package --sign` and `verify --trust`."""
    click.echo(json.dumps(keygen(out, force=force), indent=2))


@cli.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--no-load", is_flag=True, help="Check files and versions only, without loading the model.")
@click.option("--trust", default=None, envvar="PHIEDGE_TRUST", help=TRUST_HELP)
def verify_command(bundle, no_load, trust):
    """Check a bundle (archive or folder): every file against the manifest, the runtime, the model loads."""
    click.echo(json.dumps(verify(bundle, load=not no_load, trust=trust), indent=2))


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("path", type=click.Path())
@click.argument("generate_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--trust", default=None, envvar="PHIEDGE_TRUST", help=TRUST_HELP)
def run_command(path, generate_args, trust):
    """Generate with a bundle or built model folder; options as the bundled generate.py (--prompt, --chat, --adapter NAME, ...)."""
    key = load_public(trust) if trust else None
    with opened(path) as bundle:
        if bundle.is_bundle or key:
            verify_dir(bundle, load=False, trust=key)
        root = bundle.folder.path
        check_model_folder(root)
        sys.exit(generate_main([str(root), *generate_args]))


@cli.command("serve")
@click.argument("path", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="PHIEDGE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ (also read from PHIEDGE_API_KEY).")
@click.option("--max-queue", default=16, show_default=True,
              help="Requests queued or running at once; more get 429 with Retry-After.")
@click.option("--model-name", default=None, help="The model name clients send (default: the build's source name).")
@click.option("--trust", default=None, envvar="PHIEDGE_TRUST", help=TRUST_HELP)
def serve_command(path, host, port, api_key, max_queue, model_name, trust):
    """Serve a bundle or built model folder with the OpenAI API (chat completions, completions, models)."""
    key = load_public(trust) if trust else None
    with opened(path) as bundle:
        if bundle.is_bundle or key:
            verify_dir(bundle, load=False, trust=key)
        model = served(bundle.folder.path, model_name, api_key, max_queue)
        click.echo(f"serving {model.name} on http://{host}:{port}/v1", err=True)
        serve(model, host, port)


def int_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@cli.command("bench")
@click.argument("path", type=click.Path())
@click.option("-p", "--prompt-tokens", default="128,512", callback=int_list, help="pp tests (comma-separated).")
@click.option("-n", "--gen-tokens", default="128", callback=int_list, help="tg tests (comma-separated).")
@click.option("-d", "--depth", default="0", callback=int_list, help="context before tg tests (comma-separated).")
@click.option("-r", "--repetitions", default=5, show_default=True, help="Timed runs per test.")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs per test before the timed ones.")
@click.option("-t", "--threads", type=int, default=None, help="Override intra-op threads of genai_config.json.")
@click.option("-o", "--output", "fmt", type=click.Choice(["md", "csv", "json", "jsonl"]), default="md",
              show_default=True, help="Output format on stdout.")
@click.option("--compare", "old", type=click.Path(), default=None, help="Earlier run (jsonl): print ratios to it.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
              help="Also draw tokens/s per test to this PNG (needs matplotlib).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME",
              help="Also run every test with this LoRA adapter active, interleaved with the base (repeatable).")
@click.option("--trust", default=None, envvar="PHIEDGE_TRUST", help=TRUST_HELP)
def bench_command(path, prompt_tokens, gen_tokens, depth, repetitions, warmup, threads, fmt, old, plot_file, adapters,
                  trust):
    """Prompt-processing (pp) and generation (tg) speed of a model folder or bundle, llama-bench style."""
    tests = plan_tests(prompt_tokens, gen_tokens, depth)
    key = load_public(trust) if trust else None
    with opened(path) as bundle:
        if key:
            verify_dir(bundle, load=False, trust=key)
        records = bench(bundle, tests, repetitions, warmup, threads,
                        progress=lambda name: click.echo(f"[phiedge] bench {name}", err=True), adapters=list(adapters))
    click.echo(render(records, fmt))
    if plot_file:

        plot(records, plot_file)
        click.echo(f"[phiedge] chart written to {plot_file}", err=True)
    if old:
        for row in compare(records, old):
            click.echo(f"{row['test']}: {row['avg_ts']:.2f} t/s, was {row['old_avg_ts']:.2f} ({row['ratio']:.2f}x)",
                       err=True)


@cli.command("index")
@click.argument("dist", type=click.Path())
def index_command(dist):
    """Write release.json and RELEASE.md for the bundle archives in DIST (e.g. made by one CI job per target)."""
    click.echo(json.dumps(release_index(dist), indent=2))


@cli.command("demo")
@click.option("-o", "--output", "out", type=click.Path(), default="phiedge-demo", show_default=True,
              help="Folder for the checkpoint and the builds.")
@click.option("--like", default="phi-4-mini", show_default=True, help="Variant to imitate.")
@click.option("--force", is_flag=True, help="Replace earlier demo outputs.")
def demo_command(out, like, force):
    """Make a small Phi checkpoint here, build it for CPU in fp32 and int4, and check it against PyTorch."""
    summary = demo(out, like, force=force, progress=Progress())
    click.echo(json.dumps(summary, indent=2))
