"""Atomic writes: a failed or interrupted write leaves the previous file and no litter."""

import errno
import os

import pytest

from wingspan.errors import WingspanError
from wingspan.files import atomic_path, write_text


def test_a_full_disk_keeps_the_old_file_and_says_where(tmp_path, monkeypatch):
    target = tmp_path / "out" / "pred.csv"
    write_text(target, "old,complete\n")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WingspanError, match=r"disk holding .*out is full.*pred.csv was not"):
        write_text(target, "new,but cut mid-")
    assert target.read_text() == "old,complete\n"
    assert os.listdir(target.parent) == ["pred.csv"]  # no temporary file left behind


def test_an_error_while_writing_removes_the_temporary_file(tmp_path):
    target = tmp_path / "features.safetensors"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.suffix == ".safetensors" and tmp.parent == tmp_path
        raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []
