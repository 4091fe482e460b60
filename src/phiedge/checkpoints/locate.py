"""The checkpoint a `--model` names: a folder here, else a hub id or catalog name in the Hugging Face cache.

A hub checkpoint's config.json comes first, and is checked (an architecture phiedge cannot build, missing sizes)
before gigabytes of weights are fetched; then the rest of what a build reads (hub.FILES), resuming what an earlier
transfer left. Under HF_HUB_OFFLINE=1 huggingface_hub answers from the cache, and inspect() catches a snapshot
that lacks a shard its index names.
"""

from __future__ import annotations

from pathlib import Path

from phiedge.checkpoints import hub
from phiedge.checkpoints.checkpoint import Checkpoint, check_config, inspect, read_config
from phiedge.errors import ModelError


def locate(model: str | Path, revision: str | None = None) -> Checkpoint:
    """The checkpoint `model` names, inspected; a hub one fetched into the Hugging Face cache when missing."""
    if Path(model).exists():
        if revision is not None:
            raise ModelError(f"{model} is a folder: --revision ({revision}) is for a hub id")
        return inspect(model)
    repo_id = hub.hub_id(str(model))
    if repo_id is None:
        return inspect(model)  # says the folder does not exist
    try:
        config_dir = hub.download(repo_id, revision, files=["config.json"])
    except ModelError as exc:
        raise ModelError(f"{exc} (no folder {model} here either)") from None
    check_config(Path(repo_id), read_config(config_dir))  # messages name the repository, not the cache
    path, origin = hub.snapshot(repo_id, revision)
    return inspect(path, origin)
