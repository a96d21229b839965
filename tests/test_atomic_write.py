"""treelora._io.atomic_write: a target is replaced only by a complete new version, never left half-written."""

from __future__ import annotations

import pytest

from treelora._io import atomic_write


def test_file_is_replaced_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "sub" / "results.json"
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("new")

    assert atomic_write(target, write) == target
    assert target.read_text() == "new"
    tmp = seen[0]
    # beside the target (same file system, so the rename is atomic), hidden, keeping the suffix for writers that
    # infer the format from it
    assert tmp.parent == target.parent and tmp.name.startswith(".results.") and tmp.suffix == ".json"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_ctrl_c_inside_the_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_folder_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "stale.bin").write_text("stale")

    def write(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")

    atomic_write(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_failing_folder_writer_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")

    def write(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("partial")
        raise OSError("interrupted copy")

    with pytest.raises(OSError, match="interrupted copy"):
        atomic_write(target, write)
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="created nothing"):
        atomic_write(tmp_path / "x.txt", lambda tmp: None)
    assert not list(tmp_path.iterdir())
