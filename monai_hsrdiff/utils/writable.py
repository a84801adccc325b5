"""Whether an output folder can be written, checked before any work starts, so a refused run writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["unwritable_reason"]


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be created or written into, or ``None`` when it can.

    ``folder`` itself, when it exists, must be a writable directory; otherwise its nearest
    existing ancestor must be (the folder will be created there). Creates nothing. Root
    ignores permission bits, so as root only "a file is in the way" is detected.

    Example::

        reason = unwritable_reason("data/lidc")  # e.g. "data is a file, not a folder"
    """
    path = Path(folder).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no write permission on {probe}"
    return None
