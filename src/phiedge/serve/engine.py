"""One loaded model and the one generation it runs at a time, for `phiedge serve`.

A worker thread owns the model. Requests wait in a bounded queue (ServerBusy when it is full, the server's 429) and
are generated in order, each token handed to the request's asyncio queue as it comes, so a streamed reply
goes out token by token. A request that is cancelled (its client went away) stops at its next token. The loop
is the bundled generate.py's: prefill the prompt, then one token per step until an end token or the limit.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from phiedge.bundle.generate import adapter_files, prompt_window, search_length
from phiedge.bundle.model_safety import load
from phiedge.errors import ServerBusy, ServeRequestError

DONE = object()  # the end of a job's tokens


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    guidance: tuple[str, str] | None  # (kind, data) for onnxruntime-genai's constrained decoding
    adapter: str | None  # the LoRA adapter active for this request (the model `base:NAME`), or the base
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model_dir: Path, max_queue: int = 16):
        self.model, self.tokenizer = load(model_dir)
        config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.max_length = int(config["search"]["max_length"])
        self.window = prompt_window(str(model_dir))  # a static NPU model's prompt limit
        self.eos = {int(i) for i in self.tokenizer.eos_token_ids}
        self.guidance = self.probe_guidance()
        files = adapter_files(str(model_dir))
        self.adapters, self.adapter_names = None, list(files)
        if files:  # every adapter loaded once; a request picks one per generator
            import onnxruntime_genai as og

            self.adapters = og.Adapters(self.model)
            for name, path in files.items():
                self.adapters.load(path, name)
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # jobs queued or running
        self.generated = 0  # tokens generated since start, for /health
        self.cancelled = 0  # generations stopped before their end (a client gone, a stop sequence met), for /health
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self.work, name="phiedge-serve-model", daemon=True)
        self.worker.start()

    def probe_guidance(self) -> bool:
        """Whether this onnxruntime-genai build constrains decoding (llguidance): builds without it refuse."""
        import onnxruntime_genai as og

        try:
            og.GeneratorParams(self.model).set_guidance("json_schema", json.dumps({"type": "object"}))
        except Exception:  # onnxruntime-genai raises a plain RuntimeError
            return False
        return True

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise ServerBusy(f"{self.waiting} requests are queued or running (--max-queue {self.max_queue})")
            self.waiting += 1
        self.jobs.put(job)

    async def tokens(self, job: Job) -> AsyncIterator[int]:
        """The job's tokens as they are generated; cancelling the iteration cancels the job."""
        try:
            while (token := await job.out.get()) is not DONE:
                if isinstance(token, BaseException):
                    raise token
                yield token
        finally:
            job.cancelled.set()

    def work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    self.generate(job)
            except Exception as exc:  # handed to the request, which answers 500 without a traceback
                job.loop.call_soon_threadsafe(job.out.put_nowait, exc)
            finally:
                with self.lock:
                    self.waiting -= 1
                job.loop.call_soon_threadsafe(job.out.put_nowait, DONE)

    def generate(self, job: Job) -> None:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        options = {**search_length(self.model, len(job.prompt_ids) + job.max_new_tokens),
                   "do_sample": job.temperature > 0}
        if job.temperature > 0:
            options.update(temperature=job.temperature, top_p=job.top_p)
        if job.seed is not None:
            options["random_seed"] = job.seed
        params.set_search_options(**options)
        try:  # llguidance compiles the grammar here: a schema it cannot take is the request's fault (400)
            if job.guidance:
                params.set_guidance(*job.guidance)
            generator = og.Generator(self.model, params)
            if job.adapter is not None:
                generator.set_active_adapter(self.adapters, job.adapter)
        except Exception as exc:  # onnxruntime-genai raises a plain RuntimeError
            if not job.guidance:
                raise
            raise ServeRequestError(f"the schema cannot constrain decoding: {str(exc).splitlines()[0][:300]}") from None
        generator.append_tokens(job.prompt_ids)
        for _ in range(job.max_new_tokens):
            if generator.is_done():
                break
            if job.cancelled.is_set():  # the client went away, or the reply met a stop sequence
                self.cancelled += 1
                break
            generator.generate_next_token()
            self.generated += 1
            job.loop.call_soon_threadsafe(job.out.put_nowait, int(generator.get_next_tokens()[0]))

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=30)
