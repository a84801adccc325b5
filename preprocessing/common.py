"""Pieces every preprocessing command shares: patient-level splits, the datalist, run summary."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_hsrdiff.utils import atomic_write_text, unwritable_reason

__all__ = [
    "DATALIST_NAME",
    "SPLITS",
    "RunSummary",
    "add_split_arguments",
    "require_out_folder",
    "split_by_patient",
    "write_datalist",
]

DATALIST_NAME = "datalist.json"
SPLITS = ("training", "validation", "test")


def add_split_arguments(parser, seed_help: str, overwrite_help: str) -> None:
    """The options every preprocessing command shares: ``--seed``, ``--split-ratios``, ``--overwrite``."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--split-ratios", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
        help="patient-level split fractions (default 0.7 0.1 0.2)",
    )
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def require_out_folder(out: str | os.PathLike, option: str = "--out") -> None:
    """Raise ``ValueError`` unless ``out`` can be created or written; creates nothing.

    Every preprocessing command calls it first, so a bad ``--out`` stops before any input is
    read, with the folder and the reason, instead of an ``OSError`` after minutes of work.
    """
    reason = unwritable_reason(out)
    if reason:
        raise ValueError(f"cannot write {option} {out}: {reason}; choose another {option}")


def split_by_patient(
    patients: Sequence[str], ratios: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """Assign each patient to exactly one split, deterministically from ``seed``.

    ``ratios`` are (training, validation, test) fractions, normalised to sum 1. Every split
    with a positive ratio gets at least one patient when there are enough patients.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers (train, val, test), got {list(ratios)}")
    unique = sorted(set(patients))
    random.Random(seed).shuffle(unique)
    total = float(sum(ratios))
    n = len(unique)
    counts = [int(round(n * r / total)) for r in ratios]
    # make sure splits asked for are not empty while patients allow it, then fix the total
    for i, r in enumerate(ratios):
        if r > 0 and counts[i] == 0 and n >= sum(1 for x in ratios if x > 0):
            counts[i] = 1
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    counts[0] += n - sum(counts)
    out, start = {}, 0
    for name, c in zip(SPLITS, counts):
        out[name] = sorted(unique[start : start + c])
        start += c
    return out


def write_datalist(
    out_dir: str | os.PathLike,
    items: Sequence[dict[str, Any]],
    patient_splits: dict[str, list[str]],
    name: str,
    synthetic: bool,
    description: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``datalist.json`` (MONAI style) in ``out_dir`` atomically.

    ``items`` are dicts with at least ``"item"`` (path relative to ``out_dir``) and
    ``"patient"``; each goes to the split of its patient. Top-level keys ``name``,
    ``synthetic`` and ``description`` travel with the data so every consumer can show them.
    """
    where = {p: s for s, ps in patient_splits.items() for p in ps}
    doc: dict[str, Any] = {"name": name, "synthetic": bool(synthetic), "description": description}
    doc.update(extra or {})
    for s in SPLITS:
        doc[s] = []
    for it in sorted(items, key=lambda d: d["item"]):
        split = where.get(it["patient"])
        if split is None:
            raise ValueError(f"patient {it['patient']!r} of item {it['item']} is in no split")
        doc[split].append(dict(it))
    return atomic_write_text(Path(out_dir) / DATALIST_NAME, json.dumps(doc, indent=1) + "\n")


@dataclass
class RunSummary:
    """Counts shown at the end of a preprocessing run."""

    items: int = 0
    patients: int = 0
    readers_per_item: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add_item(self, n_nonempty_readers: int) -> None:
        self.items += 1
        self.readers_per_item[n_nonempty_readers] += 1

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))

    def render(self) -> str:
        lines = [f"items: {self.items}", f"patients: {self.patients}"]
        if self.readers_per_item:
            dist = ", ".join(f"{k} readers: {v}" for k, v in sorted(self.readers_per_item.items()))
            lines.append(f"non-empty annotations per item: {dist}")
        lines.append(f"skipped: {len(self.skipped)}")
        lines += [f"  - {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)
