"""The project's error types, at the bottom of the package: every other module may import them.

Bad input raises an :class:`HSRDiffInputError` subclass whose message names the file, key or
option at fault and the fix. A bundle run turns it into one ``ERROR:`` line and exit code 2
(:class:`BundleError`); a command line into ``error: ...`` and exit code 2.

Example::

    from monai_hsrdiff.errors import DatalistError, own_error

    try:
        load_datalist("data/lidc", "training")
    except DatalistError as e:
        print(e)  # names datalist.json and the split
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = [
    "BundleError",
    "DatalistError",
    "DicomSeriesError",
    "HSRDiffInputError",
    "InferenceInputError",
    "ItemFormatError",
    "OutputFolderError",
    "fail",
    "list_entries",
    "own_error",
]


class HSRDiffInputError(ValueError):
    """Unusable input: the message names the file/key/option, the value and the fix.

    A ``ValueError``, so code that handles bad values generally also handles ours.
    """


class ItemFormatError(HSRDiffInputError):
    """An item file is missing, truncated, or does not follow the item format."""


class DatalistError(HSRDiffInputError):
    """The datalist is missing, malformed, lacks the split, or lists a missing item file."""


class DicomSeriesError(HSRDiffInputError):
    """A DICOM series is missing, duplicated, unreadable, not an image, or has an irregular slice stack."""


class InferenceInputError(HSRDiffInputError):
    """The inference input or options are unusable; the message names the file/option, the value and the fix."""


class OutputFolderError(HSRDiffInputError):
    """An output folder cannot be used or replaced; the message names the folder, the entries and the fix."""


class BundleError(SystemExit):
    """Stops a bundle run with a one-paragraph message (exit code 2), no traceback.

    It derives from ``SystemExit`` because ``python -m monai.bundle`` prints a full
    traceback for ordinary exceptions raised inside config expressions.
    """

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> BundleError:
    """Print ``message`` to stderr (so it shows even when the caller catches nothing) and return the error."""
    print(f"\nERROR: {message}\n", file=sys.stderr, flush=True)
    return BundleError(message)


def own_error(exc: BaseException | None) -> BaseException | None:
    """The outermost error of this project's own types (``monai_hsrdiff.*``) in ``exc``'s chain, or None.

    Its message names the file or key at fault; the library errors around it do not: MONAI's
    ``RuntimeError("applying transform ...")`` wraps it, and its cause (zipfile's
    ``BadZipFile`` for a damaged item) names neither the file nor the split.
    """
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        if isinstance(exc, (HSRDiffInputError, BundleError)) or type(exc).__module__.startswith("monai_hsrdiff."):
            return exc
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return None


_SHOWN = 6  # entries named in a message before "..."


def list_entries(names: Sequence[str]) -> str:
    """The first few ``names`` for a message, e.g. ``"a, b, c ... (9 entries)"``."""
    return ", ".join(names[:_SHOWN]) + (f" ... ({len(names)} entries)" if len(names) > _SHOWN else "")
