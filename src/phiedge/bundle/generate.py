"""Generate text with an ONNX Runtime GenAI model folder.

This file needs only onnxruntime-genai and the Python standard library: it is copied unchanged
into every bundle, and is meant to be read top to bottom and copied into an app.

    python generate.py MODEL_DIR --prompt "Write a haiku about edge devices"
    python generate.py MODEL_DIR --adapter NAME --prompt "..."   (a LoRA adapter: NAME.onnx_adapter in MODEL_DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Opt out of ONNX Runtime and ONNX Runtime GenAI telemetry unless the user chose otherwise.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("ORTGENAI_DISABLE_TELEMETRY", "1")

import onnxruntime_genai as og  # noqa: E402


def load(model_dir: str, threads: int | None = None) -> tuple[og.Model, og.Tokenizer]:
    """Load the model and its tokenizer; optionally override the thread count of genai_config.json."""
    if "qnn" in providers(model_dir):
        register_qnn()
    config = og.Config(model_dir)
    if threads:
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    return model, og.Tokenizer(model)


def decoder_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]


def providers(model_dir: str) -> set[str]:
    """The execution providers genai_config.json asks for, in the decoder or any model of a pipeline."""
    decoder = decoder_config(model_dir)
    stages = [stage for entry in decoder.get("pipeline", []) for stage in entry.values()]
    sessions = [decoder.get("session_options", {})] + [stage.get("session_options", {}) for stage in stages]
    return {name for options in sessions for entry in options.get("provider_options", []) for name in entry}


def register_qnn() -> None:
    """The Qualcomm NPU's provider (QNN) is a plugin: its library comes from the installed onnxruntime-qnn package
    (pip install onnxruntime-qnn), never from the model folder, and is registered once per process."""
    import onnxruntime_qnn

    try:
        og.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    except RuntimeError as exc:
        if "already registered" not in str(exc):
            raise


STATIC = "decoder-pipeline"  # an NPU model: static windows and a KV cache of fixed length (genai's max_length)


def prompt_window(model_dir: str) -> int | None:
    """The most prompt tokens a static NPU model takes: its window. onnxruntime-genai 0.14.1 pads a longer prompt
    to whole windows, and then gets a reply wrong (a 100-token prompt in 64-token windows) or aborts the process
    (a padded prompt that fills the KV cache). None: any prompt that fits the context."""
    decoder = decoder_config(model_dir)
    return (decoder.get("sliding_window") or {}).get("window_size") if decoder.get("pipeline") else None


def check_prompt(model_dir: str, n_prompt: int) -> None:
    """ValueError, before anything runs, for a prompt a static model cannot take."""
    window = prompt_window(model_dir)
    if window is not None and n_prompt > window:
        raise ValueError(f"the prompt is {n_prompt} tokens and this NPU model takes at most {window} (its static "
                         "window; onnxruntime-genai 0.14.1 handles longer prompts wrongly)")


def search_length(model: og.Model, tokens: int) -> dict:
    """The search option that sizes the KV cache for `tokens`; none for a static model, whose KV length is fixed
    and whose prompt is padded to whole windows."""
    return {} if model.type == STATIC else {"max_length": tokens}


ADAPTER_SUFFIX = ".onnx_adapter"  # a LoRA adapter file beside the model; its name is the file's stem


def adapter_files(model_dir: str) -> dict[str, str]:
    """The model folder's LoRA adapters, by name."""
    return {p.name[:-len(ADAPTER_SUFFIX)]: str(p) for p in sorted(Path(model_dir).glob("*" + ADAPTER_SUFFIX))}


def load_adapter(model: og.Model, model_dir: str, name: str) -> tuple[og.Adapters, str]:
    """One adapter loaded for `generate(..., adapter=)`; a name the folder lacks is a ValueError listing its own."""
    known = adapter_files(model_dir)
    if name not in known:
        raise ValueError(f"no adapter {name!r} in {model_dir}: it has {', '.join(known) or 'none'}")
    adapters = og.Adapters(model)
    adapters.load(known[name], name)
    return adapters, name


def chat_prompt(tokenizer: og.Tokenizer, user: str, system: str | None = None, history: list | None = None) -> str:
    """Frame the conversation so far plus one user turn with the model's own chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + (history or [])
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)


def generate(model: og.Model, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, adapter: tuple[og.Adapters, str] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; stops at an end token or after max_new_tokens. `adapter`: the LoRA
    adapter (load_adapter's) to run with; without it the base model runs."""
    params = og.GeneratorParams(model)
    options = search_length(model, len(prompt_ids) + max_new_tokens)
    if temperature > 0:  # sample from the softmax of logits / temperature, cut to top-k / top-p
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0)
    else:  # greedy: always the most likely token
        options.update(do_sample=False)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)  # its weights fill the graph's LoRA inputs for this generator
    generator.append_tokens(prompt_ids)  # prefill: the whole prompt in one forward pass
    for _ in range(max_new_tokens):
        if generator.is_done():  # is_done: end token seen or max_length reached
            break
        generator.generate_next_token()  # one decode step: forward, then pick the next token
        yield int(generator.get_next_tokens()[0])


def reply(model: og.Model, tokenizer: og.Tokenizer, prompt: str, args: argparse.Namespace,
          adapter: tuple[og.Adapters, str] | None = None) -> str:
    """Stream one answer to stdout as it is generated; report speed on stderr; return the text."""
    prompt_ids = list(tokenizer.encode(prompt))
    check_prompt(args.model_dir, len(prompt_ids))
    stream = tokenizer.create_stream()  # decodes piece by piece, holding back split multi-byte characters
    start = time.perf_counter()
    first = None
    pieces, count = [], 0
    for token in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, adapter):
        if first is None:
            first = time.perf_counter()
        count += 1
        if token in tokenizer.eos_token_ids:
            break
        pieces.append(stream.decode(token))
        print(pieces[-1], end="", flush=True)
    end = time.perf_counter()
    print()
    if first is not None:
        rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
        print(f"[{len(prompt_ids)} prompt tokens, time to first token {first - start:.3f} s, "
              f"{count} new tokens at {rate:.1f} tokens/s]", file=sys.stderr)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text with an ONNX Runtime GenAI model folder.")
    parser.add_argument("model_dir", help="folder with genai_config.json, the ONNX model and tokenizer files")
    parser.add_argument("--prompt", default=None, help="the user's message (leave out with --chat)")
    parser.add_argument("--chat", action="store_true", help="interactive: read turns from stdin until an empty line")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut-off (with --temperature)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (with --temperature)")
    parser.add_argument("--threads", type=int, default=None, help="override intra-op threads")
    parser.add_argument("--adapter", default=None, help="run with this LoRA adapter (NAME.onnx_adapter in the folder)")
    args = parser.parse_args(argv)
    if (args.prompt is None) == (not args.chat):
        parser.error("give --prompt, or --chat for an interactive conversation")
    if args.adapter is not None and args.adapter not in adapter_files(args.model_dir):
        known = ", ".join(adapter_files(args.model_dir)) or "none"
        print(f"error: no adapter {args.adapter!r} in {args.model_dir}: it has {known}", file=sys.stderr)
        return 2

    model, tokenizer = load(args.model_dir, args.threads)
    adapter = load_adapter(model, args.model_dir, args.adapter) if args.adapter else None
    if not args.chat:
        try:
            reply(model, tokenizer, args.prompt if args.raw else chat_prompt(tokenizer, args.prompt, args.system), args,
                  adapter)
        except ValueError as exc:  # a prompt the model cannot take
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    history: list = []
    while True:
        print("> ", end="", flush=True, file=sys.stderr)
        user = sys.stdin.readline().strip()
        if not user:
            return 0
        try:
            answer = reply(model, tokenizer, chat_prompt(tokenizer, user, args.system, history), args, adapter)
        except ValueError as exc:  # the conversation outgrew what the model takes
            print(f"error: {exc}", file=sys.stderr)
            return 2
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


if __name__ == "__main__":
    sys.exit(main())
