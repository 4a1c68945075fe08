"""workbench.runinfo's one atomic writer: whole files or none, with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from workbench.files import atomic_write
from workbench.runinfo import write_json


def test_atomic_write_gives_the_umask_permissions_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "a.json", {"x": 1}) or tmp_path / "sub" / "a.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's owner-only 0600
    finally:
        os.umask(old)

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"x": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == '{\n  "x": 1\n}\n'  # the old content, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left behind
