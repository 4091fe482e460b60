"""Outputs appear whole or not at all: work in a hidden sibling folder, then rename it into place.

One writer per output: a lock file beside it refuses a second build into the same folder while the
first runs (the lock goes with the process, so a killed build never leaves it held). A write that fails
(disk full, permissions) is one error, and the partial folder is removed.
"""

from __future__ import annotations

import errno
import fcntl
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
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside out; refuse at once if another process holds it."""
    path = out.resolve().parent / f".{out.name}.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(f"{out} is being written by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"phiedge pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()
        path.unlink(missing_ok=True)


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; move it to `out` only if the block finishes."""
    out = Path(out)
    check_output(out, force)
    with output_lock(out):
        check_output(out, force)  # a writer that held the lock may have finished since the first check
        tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {tmp}: {exc.strerror}") from None
        try:
            yield tmp
        except OSError as exc:  # disk full, permissions, ...: one line, nothing left behind
            shutil.rmtree(tmp, ignore_errors=True)
            what = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise OutputError(f"writing {out} failed: {what}" + (f" ({exc.filename})" if exc.filename else "")) \
                from None
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
