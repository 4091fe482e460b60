import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import phiedge
from phiedge import workspace
from phiedge.workspace import OutputError, output_lock, staged_dir

# A writer in its own process: WHO holds OUT until SYNC/release exists if it is "A", else writes at once.
WRITER = """
import sys, time
from pathlib import Path
from phiedge.workspace import OutputError, staged_dir

out, who, sync = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
try:
    with staged_dir(out, force=True) as tmp:
        (tmp / "by").write_text(who)
        (sync / f"{who}.holding").touch()
        deadline = time.monotonic() + 60
        while who == "A" and not (sync / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    print("wrote")
except OutputError as exc:
    print("refused:", exc)
"""


def writer(out: Path, who: str, sync: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(phiedge.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), who, str(sync)], env=env,
                            stdout=subprocess.PIPE, text=True)


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.02)


def test_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("x")
        assert not out.exists()
    assert (out / "a").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("good")
    with pytest.raises(RuntimeError):
        with staged_dir(out, force=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with staged_dir(out, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]


def test_existing_output_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        with staged_dir(tmp_path / "out"):
            pass


def test_unwritable_parent(tmp_path, monkeypatch):
    from phiedge import workspace

    monkeypatch.setattr(workspace.os, "access", lambda path, mode: False)  # root writes anywhere: simulate
    with pytest.raises(OutputError, match="not writable"):
        with staged_dir(tmp_path / "out"):
            pass


def test_parent_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create"):
        with staged_dir(tmp_path / "file" / "sub" / "out"):
            pass


def test_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("x")
        with pytest.raises(OutputError, match=r"being written by phiedge pid \d+"):
            with staged_dir(out, force=True):
                pass
    assert (out / "a").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # lock file gone too


def test_disk_full_is_one_error_and_leaves_nothing(tmp_path):
    import errno

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="writing .*out failed: the disk is full"):
        with staged_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_disk_really_full_is_one_error_and_leaves_nothing(full_disk):
    out = full_disk / "out"
    with pytest.raises(OutputError, match="writing .*out failed: the disk is full"):
        with staged_dir(out) as tmp:
            (tmp / "big").write_bytes(b"x" * (2 << 20))  # 2 MiB on a 1 MiB file system
    assert list(full_disk.iterdir()) == []


def test_a_refused_writer_leaves_the_lock_to_its_holder(tmp_path):
    """Three processes: A holds OUT; B is refused; C, after B, must be refused too while A still writes."""
    out, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    a = writer(out, "A", sync)
    try:
        wait_for(sync / "A.holding")
        for who in ("B", "C"):
            said = writer(out, who, sync).communicate(timeout=60)[0]
            assert said.startswith(f"refused: {out} is being written by phiedge pid {a.pid}"), f"{who}: {said}"
        (sync / "release").touch()
        assert a.communicate(timeout=60)[0].strip() == "wrote"
    finally:
        a.kill()
    assert (out / "by").read_text() == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sync"]  # the lock file went with A


def test_a_lock_file_removed_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """The holder removes the lock file on release: one who opened it just before must not lock that file
    (nobody else would see it), but the one now at the path."""
    out = tmp_path / "out"
    first = ExitStack()
    first.enter_context(output_lock(out))
    opened = []
    real_open = os.open

    def open_as_the_holder_releases(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:
            first.close()  # the holder finishes after this open, before the flock
        opened.append(path)
        return fd

    monkeypatch.setattr(workspace.os, "open", open_as_the_holder_releases)
    with output_lock(out):
        monkeypatch.undo()
        assert len(opened) == 2  # it tried again on the file now at the path
        with pytest.raises(OutputError, match="being written by phiedge pid"):
            with output_lock(out):
                pass
    assert list(tmp_path.iterdir()) == []


def test_the_next_writer_removes_what_a_killed_one_left(tmp_path, capsys):
    out, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    killed = writer(out, "A", sync)
    wait_for(sync / "A.holding")
    killed.send_signal(signal.SIGKILL)  # as the out-of-memory killer does: no cleanup runs
    killed.wait(timeout=30)
    left = tmp_path / f".out.partial-{killed.pid}"
    assert (left / "by").is_file()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.partial-{live.pid}"
        running.mkdir()
        with staged_dir(out) as tmp:
            (tmp / "by").write_text("next")
        assert running.is_dir()  # a process that still runs keeps its partial
    finally:
        live.kill()
        live.wait()
    assert not left.exists() and (out / "by").read_text() == "next"
    assert f"removed {left}, left behind by process {killed.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.partial-{live.pid}", "out", "sync"]
