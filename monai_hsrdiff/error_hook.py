"""One ``ERROR:`` line for an error raised while MONAI resolves a bundle config.

MONAI wraps every error of a config item in ``RuntimeError("Failed to instantiate component
'<target>' with keywords: ...")`` or ``RuntimeError("Failed to evaluate ConfigExpression: ...")``,
and ``python -m monai.bundle`` prints the whole chain (often 100+ lines). The hook walks only the
exception chain (``__cause__`` / ``__context__``): the project's own error (``errors.own_error``)
is printed as it is; a foreign one as its type and message, with the config item that MONAI's
message describes, looked up in the command's config (``config_check.command_config``). No
interpreter frame is read.

Example (``--network_def#attention_levels "[True]"``)::

    ERROR: ValueError: HSRDiff: attention_levels must have one entry per level of channels (3), got 1: ...
      (while building config item 'network_def')
      Set HSRDIFF_TRACEBACK=1 to see the full traceback.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from types import TracebackType
from typing import Any

from monai_hsrdiff.config_check import RESERVED, command_config, flatten
from monai_hsrdiff.errors import BundleError, own_error

__all__ = ["install_error_hook"]


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_config_wrapper(exc: BaseException) -> bool:
    return type(exc) is RuntimeError and str(exc).startswith(("Failed to instantiate", "Failed to evaluate"))


_INSTANTIATE = re.compile(r"Failed to instantiate component '([^']*)' with keywords: ?([^\n]*)")


def _failing_items(wrapper: BaseException, config: dict[str, Any]) -> list[str]:
    """The config ids that MONAI's message describes: the component (its ``_target_`` and keywords)
    or the expression (its text, with MONAI's ``__local_refs['x']`` written back as ``@x``)."""
    text = str(wrapper)
    found = _INSTANTIATE.match(text)
    if found:
        target, words = found.group(1), {w for w in found.group(2).split(",") if w}
        return [
            cid for cid, v in config.items()
            if isinstance(v, dict) and isinstance(v.get("_target_"), str)
            and (target == v["_target_"] or target.endswith("." + v["_target_"]))
            and set(v) - RESERVED == words
        ]  # fmt: skip
    try:
        expr = ast.literal_eval(text.partition("\n")[2].strip())
    except (ValueError, SyntaxError):
        return []
    expr = re.sub(r"__local_refs\['([^']*)'\]", r"@\1", str(expr))
    return [cid for cid, v in config.items() if v == expr]


def _describe(cid: str) -> str:
    """``'a#b'``; a component's reserved entry as the component: ``'net', its '_requires_'``."""
    parent, _, leaf = cid.rpartition("#")
    return f"{parent!r}, its {leaf!r}" if parent and leaf in RESERVED else repr(cid)


def _config_items(wrapper: BaseException) -> list[str]:
    """:func:`_failing_items` in the command's config; [] when it cannot be rebuilt (a hook never raises)."""
    try:
        config = command_config()
        return _failing_items(wrapper, flatten(config.get())) if config is not None else []
    except (Exception, SystemExit):
        return []


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    chain = _chain(exc)
    wrappers = [e for e in chain if _is_config_wrapper(e)]
    if os.environ.get("HSRDIFF_TRACEBACK") or not wrappers:
        sys.__excepthook__(exc_type, exc, tb)
        return
    # our own error's message names the file or key (an ItemFormatError's, not that of the BadZipFile it wraps)
    own = own_error(exc)
    root = own or next((e for e in reversed(chain) if not _is_config_wrapper(e)), exc)
    if isinstance(root, BundleError):  # already printed by fail()
        return
    if own is not None:
        msg = str(own)
    else:
        where = _config_items(wrappers[-1])
        msg = f"{type(root).__name__}: {root}"
        if where:
            msg += f"\n  (while building config item {' or '.join(_describe(w) for w in where)})"
    print(f"\nERROR: {msg}\n  Set HSRDIFF_TRACEBACK=1 to see the full traceback.\n", file=sys.stderr, flush=True)


def install_error_hook() -> None:
    """Print errors raised inside MONAI's config resolution as one short message, not a traceback.

    MONAI wraps every error of a config item in ``RuntimeError("Failed to instantiate ...")``
    and the command line prints the whole chain (often 100+ lines); the hook prints the
    original error's type and message and the config item MONAI's message describes. Other
    uncaught errors keep Python's normal traceback, and ``HSRDIFF_TRACEBACK=1`` restores it for all.
    """
    sys.excepthook = _excepthook
