"""Which output folders a command may replace: the ``--overwrite`` rule, and the path guard.

The rule (issue 12): ``--overwrite`` replaces only what the same command wrote before. A folder
is recognised as the command's own by its *stamp*, ``{"writer", "format", "entries"}`` under the
key ``"hsrdiff_output"`` of a JSON file inside it (the inference case's ``summary.json``, a
data set's ``datalist.json``, or a dedicated ``.hsrdiff-output.json``), written into the
temporary folder before it is renamed into place, so the stamp exists exactly when the folder
is complete. A folder written before stamps existed is recognised by its layout instead
(:attr:`OutputLayout.legacy`). Anything else in the folder is refused, naming the unexpected
entries, and nothing is deleted.

Before that, :func:`guard_output_path` refuses outputs that no rule can make safe: an output
that is, contains or lies inside an input; one that is or contains the working directory, the
repository, the home folder or a file system root; a symbolic link that points nowhere.

Example::

    layout = OutputLayout("monai_hsrdiff.infer", CASE_FILES, stamp_file="summary.json", what="inference case")
    out = guard_output_path(args.out, inputs=[args.input])
    check_replaceable(out, layout)  # raises OutputFolderError naming e.g. "ct, notes.txt"
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# OutputFolderError is a ValueError: every command's main reports it as one line; list_entries lives in errors.py
# (it was defined here) so that atomic.py, below this module, names entries the same way
from monai_hsrdiff.errors import OutputFolderError, list_entries
from monai_hsrdiff.paths import repo_root

from .atomic import atomic_write_text

__all__ = [
    "MARKER_NAME",
    "STAMP_KEY",
    "OutputFolderError",
    "OutputLayout",
    "check_replaceable",
    "guard_output_path",
    "list_entries",
    "read_stamp",
    "repo_root",
    "unexpected_entries",
    "write_marker",
]

STAMP_KEY = "hsrdiff_output"
MARKER_NAME = ".hsrdiff-output.json"
STAMP_FORMAT = 1
# hidden names our own interrupted writes leave inside a folder: atomic_path's ".<name>.*.tmp<suffix>",
# mkdtemp(prefix=".<name>.", suffix=".partial") and replace_dir's ".<name>.*.old"
_LEFTOVER_TAGS = (".tmp", ".partial", ".old")


@dataclass(frozen=True)
class OutputLayout:
    """What one command writes into its output folder.

    Attributes:
        writer: the command, e.g. ``"monai_hsrdiff.infer"``; a stamp of another writer is refused.
        entries: the top-level names it writes (files or folders).
        stamp_file: the JSON file (one of ``entries``, or :data:`MARKER_NAME`) holding the stamp.
        what: the folder's kind for messages, e.g. ``"inference case"``.
        legacy: for a folder WITHOUT a stamp whose names are all in ``entries``: returns True when
            it is this writer's output from before stamps existed (e.g. checks the datalist's
            contents). ``None``: the names alone decide.
    """

    writer: str
    entries: tuple[str, ...]
    stamp_file: str = MARKER_NAME
    what: str = "output folder"
    legacy: Callable[[Path], bool] | None = None

    def stamp(self, entries: Iterable[str] | None = None) -> dict[str, Any]:
        """The stamp to store under :data:`STAMP_KEY` (``entries`` default: all of :attr:`entries`)."""
        names = sorted(set(self.entries if entries is None else entries) | {self.stamp_file})
        return {"writer": self.writer, "format": STAMP_FORMAT, "entries": names}


def write_marker(folder: str | os.PathLike, layout: OutputLayout, entries: Iterable[str] | None = None) -> Path:
    """Write ``layout``'s stamp as the dedicated file :data:`MARKER_NAME` in ``folder`` (atomically).

    For writers whose own files hold no JSON document to carry the stamp. Write it into the
    temporary folder before the rename, so it is there exactly when the folder is complete.
    """
    doc = {STAMP_KEY: layout.stamp(entries)}
    return atomic_write_text(Path(folder) / MARKER_NAME, json.dumps(doc, indent=1) + "\n")


def read_stamp(folder: str | os.PathLike, stamp_file: str = MARKER_NAME) -> dict[str, Any] | None:
    """The stamp in ``folder/stamp_file``, or ``None`` when that file is absent, not JSON or has none."""
    path = Path(folder) / stamp_file
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    stamp = doc.get(STAMP_KEY) if isinstance(doc, dict) else None
    if not isinstance(stamp, dict) or not isinstance(stamp.get("writer"), str) or not isinstance(stamp.get("entries"), list):
        return None
    return stamp


def _is_leftover(name: str, allowed: Iterable[str]) -> bool:
    """A hidden temporary name that our own interrupted write of one of ``allowed`` leaves."""
    return name.startswith(".") and any(name.startswith(f".{a}.") and any(t in name for t in _LEFTOVER_TAGS) for a in allowed)


def unexpected_entries(folder: str | os.PathLike, layout: OutputLayout) -> list[str]:
    """The top-level names in ``folder`` that ``layout.writer`` did not write (sorted; empty: replaceable).

    A missing or empty folder has none. A stamped folder may hold the stamp's entries; a folder
    without a stamp may hold ``layout.entries`` when ``layout.legacy`` accepts it. Hidden
    leftovers of our own interrupted writes of those entries are allowed in both.
    A stamp of another writer makes every entry unexpected.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    stamp = read_stamp(folder, layout.stamp_file)
    if stamp is not None:
        if stamp["writer"] != layout.writer:
            return names
        allowed = {str(e) for e in stamp["entries"]} | {layout.stamp_file}
    else:
        allowed = set(layout.entries)
    if stamp is None and layout.legacy is not None and not layout.legacy(folder):
        return names  # not our content, whatever the names: a user's own "datalist.json" is not ours to delete
    return [n for n in names if n not in allowed and not _is_leftover(n, allowed)]


def check_replaceable(folder: str | os.PathLike, layout: OutputLayout, option: str = "--out") -> Path:
    """Raise :class:`OutputFolderError` unless ``--overwrite`` may replace ``folder``; return it.

    Call it when ``--overwrite`` is given, before any long work; without ``--overwrite`` a
    non-empty folder is refused by the caller (with its own message), and
    :func:`unexpected_entries` tells whether ``--overwrite`` would help.

    Example::

        check_replaceable("runs/lidc/inference/case1", layout)
        # OutputFolderError: --out runs/lidc/inference/case1 holds entries that monai_hsrdiff.infer
        # did not write: ct, notes.txt; --overwrite replaces only ...
    """
    folder = Path(folder)
    unexpected = unexpected_entries(folder, layout)
    if unexpected:
        stamp = read_stamp(folder, layout.stamp_file)
        by = f" (it was written by {stamp['writer']})" if stamp is not None and stamp["writer"] != layout.writer else ""
        raise OutputFolderError(
            f"{option} {folder} holds entries that {layout.writer} did not write{by}: {list_entries(unexpected)}; "
            f"--overwrite replaces only an earlier {layout.what} of {layout.writer}, so nothing was deleted: "
            f"choose another {option} (new or empty), or move those entries away yourself"
        )
    return folder


def _within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def guard_output_path(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    option: str = "--out",
    input_option: str = "--input",
) -> Path:
    """Refuse an output folder that replacing could never make safe; return the path to write.

    Refused (:class:`OutputFolderError`), symbolic links resolved first: ``out`` equal to,
    containing or inside one of ``inputs``; ``out`` equal to or containing the working
    directory, the repository root, the home folder; a file system root; a symbolic link whose
    target does not exist. A symbolic link to a folder is written THROUGH: the returned path is
    the link's target, so the link stays and the results land where it points. Otherwise
    ``out`` is returned unchanged. Creates and deletes nothing.

    Example::

        out = guard_output_path("P", inputs=["P/ct"])
        # OutputFolderError: --out P contains the --input P/ct: ...
    """
    given = Path(out)
    if given.is_symlink() and not given.exists():
        raise OutputFolderError(
            f"{option} {given} is a symbolic link to {os.readlink(given)}, which does not exist; "
            f"point the link at a folder or pass the folder itself as {option}"
        )
    real = Path(os.path.realpath(given))
    if real == real.parent:
        raise OutputFolderError(f"{option} {given} is a file system root; choose a folder for the results")
    for inp in inputs:
        r_in = Path(os.path.realpath(inp))
        if real == r_in:
            how = "is"
        elif _within(r_in, real):
            how = "contains"
        elif _within(real, r_in):
            how = "lies inside"
        else:
            continue
        raise OutputFolderError(
            f"{option} {given} {how} the {input_option} {inp}: writing the results there would replace the input; "
            f"choose an {option} outside it"
        )
    places = [("the repository root", repo_root()), ("the current directory", Path.cwd()), ("the home folder", Path.home())]
    for what, place in places:
        place = Path(os.path.realpath(place))
        if _within(place, real):
            how = "is" if place == real else "contains"
            raise OutputFolderError(
                f"{option} {given} {how} {what} ({place}); choose a new folder for the results, e.g. {option} {place / 'results'}"
            )
    return real if given.is_symlink() else given
