"""Outputs appear whole or not at all: work in a hidden sibling folder, then rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PhiedgeError


class OutputError(PhiedgeError):
    """The output path cannot be written."""


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"{out} already exists (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent} is not writable")


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; move it to `out` only if the block finishes."""
    out = Path(out)
    check_output(out, force)
    tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
