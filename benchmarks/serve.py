"""phiedge serve's overhead: tokens/s streamed over HTTP against the same model's generation loop in-process,
time to first token, and throughput with 1, 4 and 16 concurrent clients.

    python benchmarks/serve.py MODEL_DIR                 # a built model folder (or unpacked bundle's model/)
    python benchmarks/serve.py MODEL_DIR -r 5 --tokens 128 --markdown

The server (`phiedge serve`, its own process, 127.0.0.1) and the in-process loop (the bundled generate.py's
`generate`, greedy) get the same chat prompt and the same number of new tokens, one after the other in each
repetition (alternating which goes first), so a change in the machine's load hits both; the ratio is taken
within a repetition and reported as median (min-max). Both sides are timed by the text a client sees: the
first token that decodes to text (a token the stream decodes to nothing, as a synth checkpoint's ids past its
tokenizer's vocabulary do, sends no SSE event), the same token on both sides as decoding is greedy. Time to
first token: from sending the request (in-process: from calling the loop) to that token. Decode rate: the
tokens after it over the time after it (the server's: up to the chunk with finish_reason, as the client receives
them). Throughput: C clients at once, each sending `--requests` non-streamed requests; completion tokens over
wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from phiedge.bundle.generate import generate
from phiedge.bundle.model_safety import load

PROMPT = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "from phiedge.cli import cli; cli()", "serve", str(model_dir),
                             "--port", str(port), "--max-queue", "64", "--model-name", NAME],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            sys.exit("the server did not start")
    sys.exit("the server did not answer within 120 s")


def direct(model, tokenizer, n: int) -> tuple[float, float, int, int]:
    """(time to first text, decode tokens/s after it, tokens, tokens before it) of the in-process loop."""
    ids = list(tokenizer.encode(tokenizer.apply_chat_template(json.dumps(PROMPT), add_generation_prompt=True)))
    eos = {int(i) for i in tokenizer.eos_token_ids}
    decoder = tokenizer.create_stream()
    start, first, count, silent = time.perf_counter(), None, 0, 0
    for token in generate(model, ids, n):
        if token in eos:
            break
        count += 1
        if first is None:
            if decoder.decode(token):
                first = time.perf_counter()
            else:
                silent += 1
    end = time.perf_counter()
    if first is None or count - silent < 2:
        sys.exit("the model's greedy reply had no text to time: use a checkpoint whose greedy tokens decode to text")
    return first - start, (count - silent - 1) / (end - first), count, silent


def streamed(url: str, n: int, silent: int) -> tuple[float, float, int]:
    """The same through the server's SSE stream, as a client receives it: the first token is the first chunk
    with text, the last the chunk with finish_reason; the count is the usage the server sends after it, less the
    `silent` tokens before the first text (the in-process loop's count: the same greedy tokens)."""
    body = {"model": NAME, "messages": PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, last, count = time.perf_counter(), None, None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk["choices"]:  # the usage chunk, last
                count = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            elif chunk["choices"][0]["finish_reason"]:
                last = time.perf_counter()
    if first is None or last <= first:
        sys.exit("the server's reply had no text to time: use a checkpoint whose greedy tokens decode to text")
    return first - start, (count - silent - 1) / (last - first), count


def throughput(url: str, clients: int, requests: int, n: int) -> dict:
    body = {"model": NAME, "messages": PROMPT, "max_tokens": n, "temperature": 0}

    def one(_):
        done = 0
        with httpx.Client(timeout=600) as c:
            for _ in range(requests):
                done += c.post(f"{url}/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests, "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="built model folder")
    parser.add_argument("-r", "--repetitions", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--markdown", action="store_true", help="a Markdown summary instead of JSON lines")
    args = parser.parse_args()
    port = free_port()
    server = start_server(args.model_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        model, tokenizer = load(args.model_dir)
        silent = direct(model, tokenizer, args.tokens)[3]  # warm-up, and the tokens before the first text
        streamed(url, args.tokens, silent)
        rows = []
        for rep in range(args.repetitions):
            order = ("direct", "server") if rep % 2 == 0 else ("server", "direct")
            got = {k: direct(model, tokenizer, args.tokens)[:3] if k == "direct" else streamed(url, args.tokens, silent)
                   for k in order}
            rows.append({"repetition": rep, **{f"{k}_{m}": v for k, (ttft, rate, n) in got.items()
                                               for m, v in (("ttft_s", ttft), ("tg_per_s", rate), ("tokens", n))},
                         "ratio": got["server"][1] / got["direct"][1]})
        del model
        loads = [throughput(url, c, args.requests, args.tokens) for c in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"model": str(args.model_dir), "tokens": args.tokens, "cpus": os.cpu_count(), "commit": commit,
            "load_average": os.getloadavg()}
    if not args.markdown:
        for row in rows + loads + [meta]:
            print(json.dumps(row))
        return 0
    print("| | in-process loop | phiedge serve (SSE) | server / loop |\n| --- | --- | --- | --- |")
    print(f"| tg tokens/s | {spread([r['direct_tg_per_s'] for r in rows])} | "
          f"{spread([r['server_tg_per_s'] for r in rows])} | {spread([r['ratio'] for r in rows])} |")
    print(f"| time to first token, s | {spread([r['direct_ttft_s'] for r in rows])} | "
          f"{spread([r['server_ttft_s'] for r in rows])} | |")
    print("\n| clients | requests | completion tokens | seconds | tokens/s |\n| --- | --- | --- | --- | --- |")
    for load_row in loads:
        print(f"| {load_row['clients']} | {load_row['requests']} | {load_row['tokens']} | {load_row['seconds']} | "
              f"{load_row['tokens_per_s']} |")
    print(f"\n{json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
