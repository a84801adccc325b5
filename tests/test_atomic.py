"""``monai_hsrdiff.utils.atomic``: whole files or nothing, with the permissions a plain write gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from monai_hsrdiff.utils.atomic import atomic_path, atomic_write_text


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_new_file_gets_a_plain_writes_mode(tmp_path: Path) -> None:
    """Not mkstemp's 0o600: a results file in a group-shared folder stays readable by the group."""
    path = atomic_write_text(tmp_path / "summary.json", "{}\n")
    plain = tmp_path / "plain.json"
    plain.write_text("{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_umask()
    assert path.read_text() == "{}\n"


def test_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "table.md"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_failed_write_leaves_the_target_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "item.npz"
    path.write_bytes(b"before")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.npz")  # the writer sees the suffix
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["item.npz"]
