"""``monai_hsrdiff.utils.atomic``: whole files or nothing, with the permissions a plain write gives."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from monai_hsrdiff.utils.atomic import atomic_path, atomic_write_text, building_dir, remove_interrupted_writes, replace_dir


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


_BUILDER = """
import sys, time
from pathlib import Path
from monai_hsrdiff.utils.atomic import building_dir, replace_dir
final = Path(sys.argv[1])
with building_dir(final, "tmp") as tmp:
    (tmp / "item.txt").write_text(sys.argv[2])
    print(tmp, flush=True)
    sys.stdin.readline()  # hold the build open until told to finish
    replace_dir(tmp, final)
"""


def _start_builder(final: Path, text: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, str(final), text], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return proc, Path(proc.stdout.readline().strip())


def test_cleanup_leaves_a_running_build_alone(tmp_path: Path) -> None:
    """Two writers of one folder: the second's clean-up of interrupted writes removes a killed
    build's folder (its lock died with it) but not the one another process is building right now,
    which then completes."""
    final = tmp_path / "demo_lidc"
    killed, killed_tmp = _start_builder(final, "killed")
    killed.kill()
    killed.wait(timeout=30)
    live, live_tmp = _start_builder(final, "live")
    try:
        assert killed_tmp.is_dir() and live_tmp.is_dir() and killed_tmp != live_tmp
        assert killed_tmp.name.startswith(".demo_lidc.") and killed_tmp.name.endswith(".tmp")
        said: list[str] = []
        removed = remove_interrupted_writes(final, ("tmp", "old"), said.append)
        assert removed == [killed_tmp] and not killed_tmp.exists()
        assert live_tmp.is_dir() and (live_tmp / "item.txt").read_text() == "live"
        assert any(str(live_tmp) in m and "another running process" in m for m in said), said
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0 and (final / "item.txt").read_text() == "live" and not live_tmp.exists()
    assert remove_interrupted_writes(final, ("tmp", "old"), None) == []  # nothing left behind


def test_building_dir_is_removed_when_the_build_fails(tmp_path: Path) -> None:
    final = tmp_path / "case"
    with pytest.raises(RuntimeError, match="boom"):
        with building_dir(final, "partial") as tmp:
            (tmp / "half.nii.gz").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not tmp.exists() and not final.exists() and list(tmp_path.iterdir()) == []


def test_replace_false_never_replaces_a_filled_folder(tmp_path: Path) -> None:
    """Without --overwrite the swap itself refuses a folder another process filled meanwhile (rename
    onto a non-empty folder fails atomically): its files stay, the caller's build folder is dropped."""
    final = tmp_path / "case"
    with building_dir(final, "partial") as tmp:  # into an absent folder
        (tmp / "a.txt").write_text("first")
        replace_dir(tmp, final, replace=False)
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="filled by another process"):
        with building_dir(final, "partial") as tmp:
            (tmp / "b.txt").write_text("second")
            replace_dir(tmp, final, replace=False)
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with building_dir(empty, "tmp") as tmp:  # an empty folder may be taken
        (tmp / "c.txt").write_text("x")
        replace_dir(tmp, empty, replace=False)
    assert [p.name for p in empty.iterdir()] == ["c.txt"]


def test_overwrite_rechecks_the_folder_at_the_swap(tmp_path: Path) -> None:
    """--overwrite's rule is asked again once the old folder is parked: an entry that appeared while
    the command ran (after its first check) puts the old folder back untouched, this run's dropped."""
    final = tmp_path / "case"
    final.mkdir()
    (final / "ours.txt").write_text("old")

    def foreign(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.name != "ours.txt")

    with building_dir(final, "partial") as tmp:  # nothing foreign: replaced as before
        (tmp / "ours.txt").write_text("new")
        replace_dir(tmp, final, check=foreign)
    assert (final / "ours.txt").read_text() == "new"
    with pytest.raises(FileExistsError, match=r"gained entries that this command did not write.*notes\.txt.*as it was"):
        with building_dir(final, "partial") as tmp:
            (tmp / "ours.txt").write_text("newer")
            (final / "notes.txt").write_text("a user's notes")  # arrives mid-run
            replace_dir(tmp, final, check=foreign)
    assert {p.name: p.read_text() for p in final.iterdir()} == {"ours.txt": "new", "notes.txt": "a user's notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]  # no parked or build folder left
