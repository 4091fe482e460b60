import pytest

from phiedge.workspace import OutputError, staged_dir


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
