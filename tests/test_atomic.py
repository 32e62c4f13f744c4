"""Atomic writes: the target is replaced whole or not at all."""

from __future__ import annotations

import pytest

from vigor import atomic


def test_write_then_replace(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}") and '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_temp_file_keeps_the_suffix(tmp_path):
    seen = []
    atomic.write_with(tmp_path / "plot.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"x")))
    assert seen == [".png"]


def test_remove_stale_temporaries_only_takes_atomic_write_names(tmp_path):
    """Guards the trainer's start-up clean-up: it removes what a killed atomic write leaves (a temporary
    under the name atomic_path gives) and nothing else."""
    atomic.write_text(tmp_path / "sub" / "a.txt", "kept")
    with atomic.atomic_path(tmp_path / "sub" / "model.safetensors") as tmp:
        stale = tmp
    stale.write_text("half")  # as if the process had died before os.replace
    legacy = tmp_path / "sub" / ".model.safetensors.a1b_c3d4.tmp"  # the trainer's earlier temporary name
    legacy.write_text("half")
    others = [tmp_path / "a.tmp", tmp_path / ".a.tmp", tmp_path / ".a.tmp-short.txt", tmp_path / "b.tmp-12345678"]
    others += [tmp_path / ".a.short.tmp"]
    for p in others:
        p.write_text("user")
    assert atomic.remove_stale_temporaries(tmp_path) == sorted([stale, legacy])
    assert all(p.exists() for p in others) and (tmp_path / "sub" / "a.txt").read_text() == "kept"
