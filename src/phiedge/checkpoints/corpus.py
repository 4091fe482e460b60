"""Text every machine with Python has: the standard library's own sources.

In the spirit of Phi-1's code-textbook data, and the only corpus a machine without a hub can count on.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from phiedge.checkpoints import tokenizer_files
from phiedge.errors import ModelError


def stdlib_files(limit_bytes: int | None = None) -> list[Path]:
    """Top-level stdlib modules in name order (deterministic for a given Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if limit_bytes is not None and total + size > limit_bytes:
            break
        files.append(path)
        total += size
    return files


def split_files(every: int = 10) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every 10th stdlib module is held out for evaluation."""
    files = stdlib_files()
    return [f for i, f in enumerate(files) if i % every], [f for i, f in enumerate(files) if not i % every]


def package_split(name: str, every: int = 10) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of one stdlib package (a narrow text: `email`, `asyncio`, ...), every
    10th module held out. The base model's training split has top-level modules only, never a package's."""
    folder = Path(sysconfig.get_paths()["stdlib"]) / name
    files = sorted(folder.rglob("*.py")) if folder.is_dir() and name not in ("test", "idlelib") else []
    if len(files) < 2:
        raise ModelError(f"{name!r} is not a standard library package of at least two modules here")
    return [f for i, f in enumerate(files) if i % every], [f for i, f in enumerate(files) if not i % every]


def token_stream(tokenizer, files: list[Path]) -> list[int]:
    """The files' token ids one after the other, each file ending with the end-of-text token."""
    ids: list[int] = []
    for f in files:
        ids += tokenizer(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return ids


def calibration_ids(tokenizer, n_tokens: int, text_file: Path | None = None) -> list[int]:
    """The first n_tokens of calibration text in the model's tokenizer: a user's file, or the training split
    (never the held-out one, which validation scores)."""
    return first_tokens(tokenizer, [Path(text_file)] if text_file is not None else split_files()[0], n_tokens)


def first_tokens(tokenizer, files: list[Path], n_tokens: int) -> list[int]:
    """The first n_tokens of token_stream over the files, tokenizing only as many files as that takes."""
    ids: list[int] = []
    for f in files:
        ids += token_stream(tokenizer, [f])
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def write_calibration(path: Path, text_file: Path | None = None, samples: int = 64, chars: int = 6000) -> int:
    """Calibration text as JSON lines ({"text": ...}), from a user's file or the training split.

    Never from the held-out split, so validation still scores text the calibration did not see.
    """
    import json

    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        chunks = [text[i:i + chars] for i in range(0, len(text), chars)][:samples]
    else:
        chunks = [f.read_text(encoding="utf-8", errors="replace")[:chars] for f in split_files()[0][:samples]]
    chunks = [c for c in chunks if c.strip()]
    with open(path, "w", encoding="utf-8") as out:
        for chunk in chunks:
            out.write(json.dumps({"text": chunk}) + "\n")
    return len(chunks)


def eval_ids(model_dir: str | Path, n_tokens: int) -> list[int]:
    """The first n_tokens of held-out stdlib text, in the model's tokenizer."""
    return first_tokens(tokenizer_files.load(model_dir), split_files()[1], n_tokens)
