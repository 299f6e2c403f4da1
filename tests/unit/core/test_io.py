"""Atomic files and folders: a failure leaves the previous output (or none), never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compactlm.core.errors import CompactLMError
from compactlm.core.io import atomic_dir, atomic_file, check_output, read_json, write_json


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_leaves_nothing_when_the_body_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="half-way"), atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "weights").write_text("partial")
        raise ValueError("half-way")
    assert _listing(tmp_path) == []


def test_atomic_dir_refuses_an_existing_out_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    entered = False
    with pytest.raises(CompactLMError, match="already exists; pass --overwrite"):
        with atomic_dir(out):
            entered = True
    assert not entered
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"


def test_atomic_dir_replaces_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old folder stays until the very end
    assert _listing(tmp_path) == ["out"]  # no temp or backup folder left behind
    assert _listing(out) == ["new.txt"]


def test_atomic_dir_with_overwrite_keeps_the_old_out_when_the_body_raises(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["old.txt"]


def test_atomic_dir_creates_missing_parents(tmp_path):
    with atomic_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "out" / "x").read_text() == "x"


def test_check_output_needs_an_existing_parent(tmp_path):
    with pytest.raises(CompactLMError, match="parent folder of .* does not exist"):
        check_output(tmp_path / "missing" / "out", overwrite=False)
    assert check_output(tmp_path / "out", overwrite=False) == tmp_path / "out"
    (tmp_path / "out").mkdir()
    assert check_output(tmp_path / "out", overwrite=True) == tmp_path / "out"


def test_write_json_replaces_atomically_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(TypeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise TypeError("crash")
    assert read_json(path) == {"x": 1} and _listing(tmp_path) == ["a.json"]


def test_read_json_names_a_corrupt_or_missing_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CompactLMError, match="stage record .*bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json", "stage record")
    with pytest.raises(CompactLMError, match="does not exist"):
        read_json(tmp_path / "none.json")


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".out.tmp-{pid}-deadbeef").mkdir()
    (tmp_path / f".out.tmp-{pid}-deadbeef" / "half").write_text("x")
    (tmp_path / f".table.csv.tmp-{pid}-cafe0000").write_text("half")
    live = tmp_path / f".out.tmp-{os.getpid()}-12345678"  # this process: a writer still at work
    live.mkdir()
    (tmp_path / ".out.tmp-notapid").mkdir()  # not ours to judge
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("y")
    with atomic_file(tmp_path / "table.csv") as tmp:
        tmp.write_text("a,b\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-notapid", live.name, "out", "table.csv"])
