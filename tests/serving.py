"""`phiedge serve` in its own process on a free loopback port, and an OpenAI client for it (tests only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

KEY = "sk-test-key"
NAME = "phi-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1])


def serving(model: Path, log: Path):
    """`phiedge serve MODEL` in its own process on a free port, with an API key and a queue of 4, until closed."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from phiedge.cli import cli; cli()", "serve", str(model),
                                 "--port", str(port), "--max-queue", "4", "--model-name", NAME],
                                env={**os.environ, "PHIEDGE_API_KEY": KEY}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    yield {"url": url, "proc": proc, "model": model}
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=kwargs.pop("api_key", KEY), max_retries=0,
                         **kwargs)
