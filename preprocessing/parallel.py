"""An ordered map over a process pool, for work split file by file (reading DICOM headers).

The pool's processes are forked from the same ``forkserver`` as :func:`preprocessing.common.map_patients`
uses: the server is started by the first pool of the process and keeps that pool's preload list, so a
command that maps files first must pass the preload list of its later patient pool (``preload``).

Example::

    index = DicomIndex.build(root, map_files=functools.partial(ordered_map, workers=2, preload=PRELOAD))
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["forkserver_context", "ordered_map"]


def forkserver_context(preload: Sequence[str] = (), start: bool = False) -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context whose server imports ``preload`` when it starts.

    ``start=True`` starts the server now, so its imports (pylidc: seconds) run on the other core
    while this process goes on; later calls keep the running server and its preload list.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(dict.fromkeys(preload)))
    if start:
        multiprocessing.forkserver.ensure_running()
    return ctx


def ordered_map(
    fn: Callable[[Any], Any], items: Iterable, workers: int, preload: Sequence[str] = (), min_items: int = 64
) -> Iterator:
    """``fn(item)`` for every item, in the items' order, on ``workers`` processes.

    Below ``min_items`` items (or with one worker) it is the builtin ``map`` in this process: a pool's
    start-up would cost more than it saves. ``fn`` must be picklable (a module-level function). Each
    process gets about 8 chunks, so a slow file holds back little and the results stream in order.
    """
    items = list(items)
    if workers <= 1 or len(items) < max(min_items, 2):
        return map(fn, items)
    ctx = forkserver_context(preload)

    def results() -> Iterator:
        with ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx) as pool:
            yield from pool.map(fn, items, chunksize=max(1, len(items) // (8 * workers)))

    return results()
