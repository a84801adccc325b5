"""Pieces every preprocessing command shares: patient-level splits, the datalist, run summary, workers."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_hsrdiff.utils import atomic_write_text
from preprocessing.output_folder import DATALIST_NAME
from preprocessing.parallel import forkserver_context

__all__ = [
    "DATALIST_NAME",
    "SPLITS",
    "Progress",
    "RunSummary",
    "add_split_arguments",
    "add_workers_argument",
    "check_workers",
    "map_patients",
    "run_patients",
    "split_by_patient",
    "write_datalist",
]

SPLITS = ("training", "validation", "test")


def add_split_arguments(parser, seed_help: str, overwrite_help: str) -> None:
    """The options every preprocessing command shares: ``--seed``, ``--split-ratios``, ``--overwrite``."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--split-ratios", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
        help="patient-level split fractions (default 0.7 0.1 0.2)",
    )
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


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


# ---------------------------------------------------------------- patients in parallel


def check_workers(workers: int) -> int:
    """``workers`` if it is an int >= 1, else ``ValueError`` naming ``--workers``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a whole number >= 1 (patients prepared at once), got {workers!r}")
    return workers


def _workers_arg(text: str) -> int:
    try:
        return check_workers(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (patients prepared at once), got {text!r}") from None


def add_workers_argument(parser) -> None:
    """``--workers N`` (default 1): patients prepared at once, each in its own process."""
    parser.add_argument(
        "--workers", type=_workers_arg, default=1, metavar="N",
        help="patients prepared at once, one process each (default 1); the output is the same for any N",
    )  # fmt: skip


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``[done/total] patient: status (elapsed m:ss, ETA m:ss)`` lines.

    The ETA is the mean time per patient built so far in this run times the patients still
    to build; patients kept from an earlier run (``built=False``) count as done but not
    in the rate.
    """

    def __init__(self, total: int, to_build: int, log: Callable[[str], None] | None) -> None:
        self.total, self.to_build, self.log = total, to_build, log
        self.done = self.built = 0
        self.start = time.monotonic()

    def step(self, patient: str, status: str, built: bool = True) -> None:
        self.done += 1
        self.built += int(built)
        if self.log is None:
            return
        timing = ""
        if built:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.built * (self.to_build - self.built)
            timing = f" (elapsed {_fmt_seconds(elapsed)}, ETA {_fmt_seconds(eta)})"
        self.log(f"[{self.done}/{self.total}] {patient}: {status}{timing}")


def _name_patient(error: BaseException, patient: str) -> BaseException:
    """Prefix the message with the patient unless it names it already (the type is kept)."""
    if patient not in str(error) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"patient {patient}: {error.args[0]}",)
    return error


_WORK: Callable[[str], Any] | None = None  # the work of a pool process, set by _start_worker


def _exit_with_parent() -> None:
    """In a pool process: exit at once when the main process is gone (killed), not linger.

    A patient cut short leaves only its hidden temporary folder, which the next run removes.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _start_worker(work: Callable[[str], Any], initializer: Callable[..., None] | None, initargs: tuple) -> None:
    global _WORK
    if multiprocessing.parent_process() is not None:  # a pool process, not this process (workers == 1)
        threading.Thread(target=_exit_with_parent, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)
    _WORK = work


def _run_one(patient: str) -> Any:
    return _WORK(patient)


def run_patients(
    work: Callable[[str], Any],
    patients: Sequence[str],
    done: dict[str, Any],
    workers: int,
    errors: tuple[type[BaseException], ...],
    on_error: str,
    log: Callable[[str], None] | None,
    resumed: Callable[[Any], str],
    finished: Callable[[str, Any], str],
    **pool: Any,
) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """Run ``work`` (:func:`map_patients`, ``pool``: its initializer, initargs, preload) on the
    ``patients`` not in ``done`` (finished by an earlier run), with :class:`Progress` lines:
    ``resumed(result)`` for a kept patient, ``finished(patient, result)`` for a built one.

    Returns:
        (results by patient, ``done`` included; the patients' own errors under ``on_error="skip"``).
    """
    todo = [p for p in patients if p not in done]
    steps = Progress(len(patients), len(todo), log)
    for patient, result in done.items():
        steps.step(patient, resumed(result), built=False)
    results, failed = dict(done), {}
    for patient, result, error in map_patients(work, todo, workers, errors, on_error, **pool):
        if error is not None:
            failed[patient] = error
            steps.step(patient, f"FAILED, skipped: {error}")
        else:
            results[patient] = result
            steps.step(patient, finished(patient, result))
    return results, failed


def map_patients(
    work: Callable[[str], Any],
    patients: Sequence[str],
    workers: int,
    errors: tuple[type[BaseException], ...],
    on_error: str = "raise",
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    preload: Sequence[str] = (),
) -> Iterator[tuple[str, Any, BaseException | None]]:
    """Run ``work(patient)`` for every patient; yield ``(patient, result, None)`` as each finishes.

    With ``workers == 1`` everything runs in this process, in ``patients`` order. With more,
    a pool of ``workers`` processes runs them and results come in completion order, so a
    caller that needs a fixed order collects them by patient. The processes are forked from
    a ``forkserver`` that imported ``preload`` (and the modules of ``work`` and
    ``initializer``) but never ran any of it: no database connection or thread pool of this
    process is inherited, and a module as slow to import as torch is imported once, not once
    per worker (the server lives as long as this process, so later pools start at once; its
    preload list is the first pool's). ``work`` (and ``initializer``, run once per process
    first) must be picklable: module-level functions or ``functools.partial``s.

    An exception of a type in ``errors`` is the patient's own failure, its message prefixed
    with the patient unless it names it: under ``on_error="skip"`` it is yielded as
    ``(patient, None, error)`` and the others go on; under ``"raise"`` no further patient
    starts, the running ones finish (so their items are kept) and the error is raised. Any
    other exception is raised the same way.
    """
    check_workers(workers)
    if workers == 1 or len(patients) <= 1:
        _start_worker(work, initializer, initargs)
        for patient in patients:
            try:
                yield patient, work(patient), None
            except errors as e:
                if on_error == "raise":
                    raise _name_patient(e, patient) from None
                yield patient, None, _name_patient(e, patient)
        return
    modules = [getattr(f, "__module__", None) for f in (work, initializer)]
    ctx = forkserver_context([*preload, *(m for m in modules if m and m != "__main__")])
    pool = ProcessPoolExecutor(min(workers, len(patients)), mp_context=ctx, initializer=_start_worker,
                               initargs=(work, initializer, initargs))  # fmt: skip
    try:
        futures: dict[Future, str] = {pool.submit(_run_one, p): p for p in patients}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=lambda f: patients.index(futures[f])):
                patient, e = futures[f], f.exception()
                if e is None:
                    yield patient, f.result(), None
                elif isinstance(e, errors) and on_error == "skip":
                    yield patient, None, _name_patient(e, patient)
                else:
                    raise _name_patient(e, patient) if isinstance(e, errors) else e
    finally:
        # on an error or Ctrl-C: start nothing new, let the running patients finish (atomically)
        pool.shutdown(wait=True, cancel_futures=True)
