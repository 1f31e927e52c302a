"""rhaas.atomic.write_atomic: whole old file or whole new file, with the mode asked for."""

from __future__ import annotations

import os
import stat

import pytest

from rhaas.atomic import write_atomic


def test_replaces_with_mode(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_atomic(target, "new ☃", mode=0o600)
    assert target.read_text(encoding="utf-8") == "new ☃"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    write_atomic(target, b"bytes", mode=0o640, durable=False)
    assert target.read_bytes() == b"bytes"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_failure_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_atomic(target, "data")  # a directory cannot be replaced by a file
    assert (target / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
