"""Generate text with an ONNX Runtime GenAI model folder.

This file needs only onnxruntime-genai and the Python standard library: it is copied unchanged
into every bundle, and is meant to be read top to bottom and copied into an app.

    python generate.py MODEL_DIR --prompt "Write a haiku about edge devices"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

# Opt out of ONNX Runtime and ONNX Runtime GenAI telemetry unless the user chose otherwise.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("ORTGENAI_DISABLE_TELEMETRY", "1")

import onnxruntime_genai as og  # noqa: E402


def load(model_dir: str, threads: int | None = None) -> tuple[og.Model, og.Tokenizer]:
    """Load the model and its tokenizer; optionally override the thread count of genai_config.json."""
    config = og.Config(model_dir)
    if threads:
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    return model, og.Tokenizer(model)


def chat_prompt(tokenizer: og.Tokenizer, user: str, system: str | None = None) -> str:
    """Frame one user turn with the model's own chat template (from tokenizer_config.json)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)


def generate(model: og.Model, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0) -> Iterator[int]:
    """Yield new token ids one at a time; stops at an end token or after max_new_tokens."""
    params = og.GeneratorParams(model)
    options = {"max_length": len(prompt_ids) + max_new_tokens}
    if temperature > 0:  # sample from the softmax of logits / temperature, cut to top-k / top-p
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0)
    else:  # greedy: always the most likely token
        options.update(do_sample=False)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)  # prefill: the whole prompt in one forward pass
    while not generator.is_done():  # is_done: end token seen or max_length reached
        generator.generate_next_token()  # one decode step: forward, then pick the next token
        yield int(generator.get_next_tokens()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text with an ONNX Runtime GenAI model folder.")
    parser.add_argument("model_dir", help="folder with genai_config.json, the ONNX model and tokenizer files")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut-off (with --temperature)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (with --temperature)")
    parser.add_argument("--threads", type=int, default=None, help="override intra-op threads")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model_dir, args.threads)
    text = args.prompt if args.raw else chat_prompt(tokenizer, args.prompt, args.system)
    prompt_ids = list(tokenizer.encode(text))
    stream = tokenizer.create_stream()  # decodes piece by piece, holding back split multi-byte characters

    start = time.perf_counter()
    first = None
    count = 0
    for token in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k):
        if first is None:
            first = time.perf_counter()
        count += 1
        if token in tokenizer.eos_token_ids:
            break
        print(stream.decode(token), end="", flush=True)
    end = time.perf_counter()
    print()
    if first is not None:
        rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
        print(f"[{len(prompt_ids)} prompt tokens, time to first token {first - start:.3f} s, "
              f"{count} new tokens at {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
