"""Test helper: run a module as ``python -m`` would, with one writer made to stall half-way.

Usage::

    python tests/fault_injection.py --target torch:save --out-arg 1 --match 'checkpoints/tmp' \\
        --call 3 --marker /tmp/m -- monai.bundle run training ...

Before the module runs, ``--target`` (``module:function``) is replaced by a wrapper. The
N-th call (``--call``) whose output path (positional argument ``--out-arg``: a path or an
open file object) matches the regular expression ``--match`` runs the real writer, then
truncates what it wrote to half its size, flushes it, writes that path into the file
``--marker`` and sleeps: the process now stands exactly where a kill during that write would
find it. The test waits for the marker and sends SIGKILL. Other calls pass straight through.

Only this process is patched (the test's own process never is), and the patch is applied
before the module under test is imported, so ``from module import function`` there picks up
the wrapper too.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _name(target: Any) -> str:
    """The file name behind a writer's output argument (a path or an open file object)."""
    if isinstance(target, (str, os.PathLike)):
        return os.fspath(target)
    name = getattr(target, "name", target)
    if isinstance(name, int):  # a file opened from a descriptor (tempfile.NamedTemporaryFile().file)
        return os.readlink(f"/proc/self/fd/{name}")
    return str(name)


def _truncate_half(target: Any) -> None:
    """Cut what the real writer wrote to half its bytes, as a kill during the write leaves it."""
    if hasattr(target, "truncate"):  # an open file object (ignite's DiskSaver hands torch.save one)
        target.flush()
        size = target.seek(0, os.SEEK_END)
        target.truncate(size // 2)
        target.flush()
        os.fsync(target.fileno())
    else:
        path = Path(target)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def stalling(real: Callable, out_arg: int, match: str, call: int, marker: Path) -> Callable:
    """Wrap ``real`` so that its ``call``-th matching call leaves a half-written output and sleeps."""
    pattern = re.compile(match)
    seen = 0

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        target = args[out_arg] if len(args) > out_arg else None
        if target is None or not pattern.search(_name(target)):
            return real(*args, **kwargs)
        seen += 1
        if seen != call:
            return real(*args, **kwargs)
        real(*args, **kwargs)
        _truncate_half(target)
        marker.write_text(_name(target), encoding="utf-8")  # the test kills once this exists
        while True:
            time.sleep(60)

    return wrapper


def main(argv: list[str]) -> None:
    """``argv``: our options, ``--``, then the module and its arguments."""
    if "--" not in argv:
        raise SystemExit("fault_injection.py: give the module to run after --")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="fault_injection.py")
    p.add_argument("--target", required=True, help="module:function to wrap, e.g. torch:save")
    p.add_argument("--out-arg", type=int, default=0, help="position of the output path / file argument")
    p.add_argument("--match", default="", help="regular expression searched in the output's name")
    p.add_argument("--call", type=int, default=1, help="stall in the N-th matching call (1-based)")
    p.add_argument("--marker", type=Path, required=True, help="file written when the stall begins")
    a = p.parse_args(argv[:split])
    run_module, *run_args = argv[split + 1 :]
    sys.path[0] = os.getcwd()  # as python -m: the working folder, not tests/, comes first
    module_name, func_name = a.target.split(":")
    module = importlib.import_module(module_name)
    setattr(module, func_name, stalling(getattr(module, func_name), a.out_arg, a.match, a.call, a.marker))
    sys.argv = [run_module, *run_args]
    runpy.run_module(run_module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
