"""`phiedge serve PATH`: verify the bundle as `run` does, load it once, and serve it with uvicorn."""

from __future__ import annotations

from pathlib import Path

from phiedge.artifacts import ModelFolder
from phiedge.serve.app import Served, create_app
from phiedge.serve.chat import Format
from phiedge.serve.engine import Engine


def served(model_dir: Path, name: str | None = None, api_key: str | None = None, max_queue: int = 16) -> Served:
    """The model folder loaded, named as clients will ask for it (the build's source name by default)."""
    record = ModelFolder(model_dir).record
    variant = record.source.variant if record else None
    default = (record.source.name if record and record.source.name else Path(model_dir).name)
    return Served(Engine(Path(model_dir), max_queue), name or default, Format.of(variant), api_key)


def serve(model: Served, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    try:
        uvicorn.run(create_app(model), host=host, port=port, log_level="warning")
    finally:
        model.engine.close()
