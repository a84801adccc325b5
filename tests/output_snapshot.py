"""What "the same output" means for preprocessing (``--workers N``): every file's bytes, except
that a ``.npz`` item is compared by its zip entries, because ``np.savez_compressed`` stamps each
entry with its write time. Used by tests/test_preprocessing_workers.py and
benchmarks/preprocessing_speed.py."""

from __future__ import annotations

import zipfile
from pathlib import Path


def output_snapshot(out: Path) -> dict[str, object]:
    """Every file under ``out`` -> its bytes (``.npz``: its zip entries without the write time)."""
    snap: dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                snap[rel] = [(i.filename, i.compress_type, i.CRC, i.file_size, i.compress_size, z.read(i)) for i in z.infolist()]
        else:
            snap[rel] = path.read_bytes()
    return snap
