"""The output folder of a preprocessing command: what it may write into, replace and clean up.

A converter writes ``datalist.json`` and ``items/`` into ``--out`` and never touches a folder
holding anything else (``monai_hsrdiff.utils.outputs`` is the rule; this is its converter
layout). Hidden leftovers of its own killed writes are its own, and removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai_hsrdiff.utils import (
    OutputFolderError,
    OutputLayout,
    check_replaceable,
    guard_output_path,
    list_entries,
    remove_interrupted_writes,
    unexpected_entries,
    unwritable_reason,
)

__all__ = [
    "DATALIST_NAME",
    "check_output_folder",
    "converter_layout",
    "foreign_item_files",
    "remove_killed_unit_writes",
    "require_out_folder",
    "stray_item_files",
]

DATALIST_NAME = "datalist.json"


def require_out_folder(out: str | os.PathLike, option: str = "--out") -> None:
    """Raise ``ValueError`` unless ``out`` can be created or written; creates nothing.

    Every preprocessing command calls it first, so a bad ``--out`` stops before any input is
    read, with the folder and the reason, instead of an ``OSError`` after minutes of work.
    """
    reason = unwritable_reason(out)
    if reason:
        raise ValueError(f"cannot write {option} {out}: {reason}; choose another {option}")


_HIDDEN_LEFTOVER = re.compile(r"^\..+\.(tmp|partial|old)")  # mkdtemp/atomic_path/replace_dir names of a killed write
_UNIT_LEFTOVER = re.compile(r"^\.(.+)\.[^.]+\.(?:tmp|partial|old)$")  # .<unit>.<mkdtemp part>.<suffix>


def _read_datalist(folder: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((folder / DATALIST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stray_item_files(out: Path, unit: str | None, manifest: str) -> list[str]:
    """Paths under ``out/items`` a converter would not have written (``items/...``, sorted).

    A converter writes ``items/<unit>/*.npz`` plus ``<unit>/<manifest>`` for every unit
    (``unit`` a regular expression of the folder names, e.g. a patient id), or, with
    ``unit=None``, ``items/*.npz`` plus ``items/<manifest>``. Hidden leftovers of its own
    killed writes are allowed; it removes them itself.
    """
    items = out / "items"
    if not items.exists():
        return []
    if not items.is_dir():
        return ["items"]
    if unit is None:
        return [f"items/{n}" for n in foreign_item_files(items, manifest)]
    stray = []
    for p in sorted(items.iterdir()):
        if _HIDDEN_LEFTOVER.match(p.name):
            continue
        if p.is_dir() and re.fullmatch(unit, p.name):
            stray += [f"items/{p.name}/{n}" for n in foreign_item_files(p, manifest)]
        else:
            stray.append(f"items/{p.name}")
    return stray


def remove_killed_unit_writes(items_dir: str | os.PathLike, unit: str, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what killed writes of any unit left in ``items_dir``: ``.<unit>.*.tmp/partial/old``.

    ``unit`` is the regular expression of the unit (patient) folder names. Every such unit
    counts, not only those of this run's input, so leftovers of patients an earlier run had and
    this one has not do not stay for good; a running write's folder is left alone
    (:func:`monai_hsrdiff.utils.remove_interrupted_writes`). Returns what was removed.
    """
    items_dir = Path(items_dir)
    if not items_dir.is_dir():
        return []
    units = sorted({m.group(1) for p in items_dir.iterdir() if (m := _UNIT_LEFTOVER.match(p.name)) and re.fullmatch(unit, m.group(1))})
    return [r for u in units for r in remove_interrupted_writes(items_dir / u, ("tmp", "partial", "old"), log=log)]


def foreign_item_files(folder: str | os.PathLike, manifest: str) -> list[str]:
    """Names in one items folder a converter would not have written (sorted): not an ``.npz`` file,
    not its ``manifest``, not a hidden leftover of its own. Also asked at the swap of a redone
    patient folder (``replace_dir(..., check=...)``), so a file added while it ran is kept."""
    return [
        p.name for p in sorted(Path(folder).iterdir())
        if not (p.is_file() and (p.suffix == ".npz" or p.name == manifest)) and not _HIDDEN_LEFTOVER.match(p.name)
    ]  # fmt: skip


def converter_layout(writer: str, what: str, looks_like_ours: Callable[[dict[str, Any]], bool], unit: str | None, manifest: str) -> OutputLayout:
    """The output layout of a converter writing ``datalist.json`` and ``items/`` (the stamp in the datalist).

    An unstamped folder is its output when its datalist (if any) passes ``looks_like_ours``
    (an earlier release's datalist, recognised by its keys) and ``items/`` (if any) holds
    nothing but units (:func:`stray_item_files`); a folder with ``items/`` and no datalist is
    its own interrupted first run, which a re-run resumes.
    """

    def legacy(folder: Path) -> bool:
        has_list, has_items = (folder / DATALIST_NAME).exists(), (folder / "items").exists()
        if not (has_list or has_items) or stray_item_files(folder, unit, manifest):
            return False
        if has_list:
            doc = _read_datalist(folder)
            return doc is not None and looks_like_ours(doc)
        return True

    return OutputLayout(writer, (DATALIST_NAME, "items"), stamp_file=DATALIST_NAME, what=what, legacy=legacy)


def check_output_folder(
    out: str | os.PathLike,
    layout: OutputLayout,
    overwrite: bool,
    unit: str | None,
    manifest: str,
    inputs: Sequence[str | os.PathLike] = (),
    input_option: str = "--root",
) -> Path:
    """Refuse, before any input is read, an ``--out`` holding anything this converter did not write.

    The converters keep finished units across runs (a re-run resumes, ``--overwrite`` redoes
    them), so their own earlier output, finished or interrupted, is accepted with or without
    ``--overwrite``; anything else (another tool's ``datalist.json``, a stray file under
    ``items/``) is refused naming the entries, and nothing is deleted. Also refused: an ``out``
    that is, holds or lies inside an input, the working directory, the repository, the home
    folder or ``/`` (:func:`monai_hsrdiff.utils.guard_output_path`, the rule of every command).

    Returns:
        the folder to write (a symbolic link is written through).

    Raises:
        OutputFolderError: (a ``ValueError``) naming the folder, the entries and the fix.
    """
    out = guard_output_path(out, inputs=inputs, input_option=input_option)
    if not out.is_dir():
        return out
    if overwrite:
        check_replaceable(out, layout)
    foreign = unexpected_entries(out, layout) or stray_item_files(out, unit, manifest)
    if foreign:
        raise OutputFolderError(
            f"--out {out} holds entries that {layout.writer} did not write: {list_entries(foreign)}; it writes only into a new or "
            f"empty folder or into its own earlier output (resumed; redone with --overwrite), so nothing was "
            f"touched: choose another --out, or move those entries away yourself"
        )
    return out
