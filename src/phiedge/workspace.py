"""Outputs appear whole or not at all: work in a hidden sibling (`.NAME.partial-PID`), then rename it into place.

One writer per output: a lock file beside it refuses a second writer into the same path while the first
runs (the lock goes with the process, so a killed build never leaves it held). A write that fails (disk
full, permissions) is one error, and the partial output is removed. A writer killed outright (SIGKILL, the
out-of-memory killer) cannot clean up: the next writer into the same path, holding the lock, removes what
it left.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phiedge.errors import OutputError
from phiedge.progress import Progress

LEFTOVERS = ("partial", "old")  # .NAME.partial-PID (being written), .NAME.old-PID (being replaced)


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


def write_failed(out: Path, exc: OSError) -> OutputError:
    what = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    return OutputError(f"writing {out} failed: {what}" + (f" ({exc.filename})" if exc.filename else ""))


def _locked_here(path: Path, fd: int) -> bool:
    """Whether `path` still names the file we locked. A holder removes the lock file on release; a process
    that opened it just before then locks a file nobody else will open again, and must try anew."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside out; refuse at once if another process holds it.

    Only the holder removes the lock file, and only while it still holds it: a refused writer that removed
    it would let a third one lock a new file while the first still writes."""
    path = out.resolve().parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{out} is being written by {holder}; wait for it to finish") from None
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {exc.strerror}") from None
        if _locked_here(path, fd):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"phiedge pid {os.getpid()}".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding it: see _locked_here
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(out: Path, progress: Progress | None = None) -> list[Path]:
    """Remove the partial outputs beside out of writers that are gone, and say so; call it holding the lock.

    A leftover of a process that still runs is not touched (its PID may have been reused, or it may be a
    writer of an older phiedge without the lock)."""
    progress = progress or Progress(quiet=True)
    removed = []
    prefix = f".{out.name}."
    for path in sorted(out.resolve().parent.iterdir()):
        kind, _, pid = path.name[len(prefix):].rpartition("-")
        if not path.name.startswith(prefix) or kind not in LEFTOVERS or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _running(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        if int(pid) != os.getpid():
            progress.warn(f"removed {path}, left behind by process {pid}, which was stopped before it finished")
    return removed


@contextmanager
def staged_dir(out: Path, force: bool = False, progress: Progress | None = None) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; move it to `out` only if the block finishes."""
    out = Path(out)
    check_output(out, force)
    with output_lock(out):
        check_output(out, force)  # a writer that held the lock may have finished since the first check
        remove_leftovers(out, progress)
        tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
        try:
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {tmp}: {exc.strerror}") from None
        try:
            yield tmp
        except OSError as exc:  # disk full, permissions, ...: one line, nothing left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(out, exc) from None
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


@contextmanager
def staged_file(out: Path, force: bool = False, progress: Progress | None = None) -> Iterator[Path]:
    """Yield a path beside `out` to write a file at; it becomes `out` only if the block finishes."""
    out = Path(out)
    check_output(out, force)
    with output_lock(out):
        check_output(out, force)
        remove_leftovers(out, progress)
        tmp = out.resolve().parent / f".{out.name}.partial-{os.getpid()}"
        try:
            yield tmp
            os.replace(tmp, out)
        except OSError as exc:  # disk full, permissions, ...: one line, nothing left behind
            raise write_failed(out, exc) from None
        finally:
            tmp.unlink(missing_ok=True)
