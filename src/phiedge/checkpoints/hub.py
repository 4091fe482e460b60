"""Checkpoints named by Hugging Face hub id or catalog name, fetched with huggingface_hub: into a folder
(`phiedge fetch`) or into the Hugging Face cache (`phiedge build --model ID`, locate.py).

A catalog name or alias (phi-4-mini, see `phiedge models`) is looked up for its hub id. huggingface_hub's
`snapshot_download` fills the folder, resuming a transfer that was cut off, showing a progress bar per file,
reading a token for gated repositories from HF_TOKEN or `hf auth login`, and under HF_HUB_OFFLINE=1 answering
from what it has. Only what a build reads is fetched (FILES): safetensors weights, configs, tokenizer files
and licences at the repository's top level; not `*.bin`, not the repository's own `onnx/` or other folders,
and never its Python files, which phiedge does not run. ORIGIN, written into a fetched folder once every file
is there, says which commit it came from; a build of the folder records it (`origin`), as a build from the cache
records the snapshot's commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from phiedge.artifacts import HubOrigin, read
from phiedge.catalog import find_variant
from phiedge.errors import ModelError, NotFoundError

FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
         "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
         "vocab.json", "merges.txt", "chat_template.jinja", "LICENSE*", "NOTICE*"]
SUBFOLDERS = ["*/*"]  # fnmatch's * crosses "/": without this, onnx/*.safetensors would match
ORIGIN = "phiedge_origin.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_id(model: str) -> str | None:
    """The hub id `model` names when it is not a folder here: itself, or a catalog name's; None for a path."""
    if Path(model).exists():
        return None
    try:
        return find_variant(model).hf_id
    except NotFoundError:
        pass
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not HUB_ID.match(model):
        return None
    try:
        validate_repo_id(model)  # what snapshot_download would refuse ("--", "..", a trailing ".git")
    except HFValidationError:
        return None
    return model


def download(repo_id: str, revision: str | None = None, local_dir: Path | None = None,
             files: list[str] = FILES) -> Path:
    """The checkpoint's folder after fetching `files` (patterns) of it into the cache, or into local_dir; any
    failure one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=files, ignore_patterns=SUBFOLDERS,
                                 local_dir=str(local_dir) if local_dir is not None else None)
    except GatedRepoError:
        raise ModelError(f"{at} is gated: accept its licence on the hub and set HF_TOKEN (or run hf auth login)")
    except RepositoryNotFoundError:
        raise ModelError(f"{at}: no such repository on the hub, or it is private and HF_TOKEN does not open it")
    except RevisionNotFoundError:
        raise ModelError(f"{at}: the repository has no revision {revision!r}")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelError(f"{at} is not in the Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE is "
                         f"set or the connection failed): run `phiedge fetch {repo_id}` where it can")
    except EntryNotFoundError as exc:
        raise ModelError(f"{at}: a file the listing named is missing on the hub ({first_line(exc)})")
    except HfHubHTTPError as exc:
        raise ModelError(f"{at}: the hub answered {first_line(exc)}")
    except OSError as exc:  # a full disk, an unwritable cache, a connection reset past huggingface_hub's retries
        raise ModelError(f"{at}: fetching failed: {exc.strerror or exc}")
    return Path(path)


def snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, HubOrigin]:
    """`build --model ID`: the checkpoint in the Hugging Face cache (fetched into it when missing) and its origin,
    the commit being the snapshot folder's name."""
    path = download(repo_id, revision)
    return path, HubOrigin(repo_id=repo_id, revision=revision, commit=path.name if COMMIT.match(path.name) else None)


def quiet() -> None:
    """No huggingface_hub progress bars on stderr (`build -q`)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def first_line(exc: Exception) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def fetch(model: str, out: Path, revision: str | None = None) -> HubOrigin:
    """`phiedge fetch`: the checkpoint's files into `out` (resumable), then ORIGIN saying where they came from."""
    repo_id = hub_id(model)
    if repo_id is None:
        raise ModelError(f"{model} is neither a hub id (OWNER/NAME) nor a catalog name (see `phiedge models`)")
    out = Path(out)
    (out / ORIGIN).unlink(missing_ok=True)  # written again only when this fetch is complete
    path = download(repo_id, revision, local_dir=out)
    commit = local_commit(path)
    origin = HubOrigin(repo_id=repo_id, revision=revision, commit=commit)
    (path / ORIGIN).write_text(origin.model_dump_json(indent=2) + "\n")
    return origin


def local_commit(folder: Path) -> str | None:
    """The commit huggingface_hub recorded for the files of a local_dir download (its .cache metadata)."""
    commits = set()
    for meta in (folder / ".cache" / "huggingface" / "download").rglob("*.metadata"):
        first = meta.read_text().splitlines()[:1]
        if first and COMMIT.match(first[0]):
            commits.add(first[0])
    return commits.pop() if len(commits) == 1 else None


def origin(folder: Path) -> HubOrigin | None:
    """Where a checkpoint folder came from on the hub, or None for one that was not fetched."""
    folder = Path(folder).resolve()
    if (folder / ORIGIN).is_file():
        return read(HubOrigin, folder / ORIGIN, ModelError)
    return None
