"""The lock of a cohort folder: two cohort runs on the same ``--out`` never write into each other.

:func:`take_lock` creates ``<out>/.cohort.lock`` with ``O_CREAT | O_EXCL`` (so exactly one run
can create it) holding a small JSON record of its holder::

    {"pid": 4242, "host": "node7", "started": "2026-12-02T19:40:11Z", "proc_start": 123456,
     "boot_id": "...", "token": "9f2c...", "command": "monai_hsrdiff cohort inference"}

and :meth:`CohortLock.release` removes it when the run ends (in a ``finally``: a failing case,
an error or Ctrl-C release it too; only ``SIGKILL`` or a power cut leave it behind). A second
run on the same folder then finds the lock and:

- holder alive on this host (``pid`` runs, and is still the process that wrote the lock:
  the same ``/proc`` start time and boot): stops at once with :class:`CohortLockedError`
  naming the folder, the pid, the host and the start time, before the model is loaded;
- holder on another host (its pid cannot be checked from here): stops the same way; the
  message says to delete the lock if that run is over;
- holder dead on this host (a killed run): the lock is taken over, saying so, and the run goes
  on (the killed run's unfinished case is redone, its finished cases skipped);
- an unreadable lock (not this record): stops, naming the file; never deleted.

The lock is the cohort command's own file: a hidden name that no case id can take (ids start
with a letter, digit or ``_``), and nothing else in the cohort folder is read as a case.

Example::

    lock = take_lock("runs/lidc/cohort1", log=print)   # CohortLockedError if a live run holds it
    try:
        ...  # run the cases
    finally:
        lock.release()
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_hsrdiff.errors import InferenceInputError

__all__ = ["LOCK_FILE", "CohortLock", "CohortLockedError", "lock_holder", "refuse_live_lock", "take_lock"]

LOCK_FILE = ".cohort.lock"
_COMMAND = "monai_hsrdiff cohort inference"
_READ_WAIT_S = 1.0  # a lock just created by another run may be empty for an instant: read again for this long


class CohortLockedError(InferenceInputError):
    """Another cohort run holds the cohort folder's lock (or its lock file is unreadable); nothing was written."""


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); ``None`` off Linux."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _alive(info: dict[str, Any]) -> bool:
    """Whether the lock's holder (on this host) still runs; ``True`` when it cannot be told."""
    pid = int(info["pid"])
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return False  # written before this machine's last boot
    if os.name == "nt":
        return True  # os.kill would terminate the process there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. PermissionError: a process of another user
    try:  # a zombie (killed, not yet reaped) has ended
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    start = _proc_start(pid)
    return not (info.get("proc_start") is not None and start is not None and start != info["proc_start"])  # pid reused


def _read(path: Path) -> tuple[dict[str, Any] | None, bytes]:
    """The lock record at ``path`` and its bytes; ``(None, b"")`` if it is gone. Raises CohortLockedError if unreadable."""
    deadline = time.monotonic() + _READ_WAIT_S
    while True:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no lock (or --out is a file: refused by the caller)
            return None, b""
        except OSError as e:
            raise CohortLockedError(f"{path}: cannot read the cohort lock ({type(e).__name__}: {e})") from None
        try:
            info = json.loads(data)
            if isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str):
                return info, data
        except ValueError:
            pass
        if time.monotonic() > deadline:
            raise CohortLockedError(
                f"{path}: not a cohort lock of this command (expected a JSON record with pid and host); it was not "
                f"deleted: if no cohort run writes to {path.parent}, delete {path} yourself and run again"
            )
        time.sleep(0.05)


def lock_holder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ``<folder>/.cohort.lock`` (pid, host, started, ...); ``None`` when there is none."""
    return _read(Path(folder) / LOCK_FILE)[0]


def _locked_error(path: Path, info: dict[str, Any]) -> CohortLockedError:
    here = info["host"] == socket.gethostname()
    where = "on this host" if here else f"on host {info['host']} (its state cannot be checked from here)"
    return CohortLockedError(
        f"--out {path.parent}: another cohort run (pid {info['pid']} {where}, started {info.get('started', '?')}) "
        f"is writing to this folder (lock {path}); wait for it to end or choose another --out"
        + ("" if here else f"; if that run is over, delete {path} and run again")
    )


def refuse_live_lock(folder: str | os.PathLike) -> None:
    """Raise :class:`CohortLockedError` when a live cohort run holds ``folder``'s lock (a quick check before
    anything loads; a stale lock is left for :func:`take_lock` to take over)."""
    path = Path(folder) / LOCK_FILE
    info, _ = _read(path)
    if info is not None and (info["host"] != socket.gethostname() or _alive(info)):
        raise _locked_error(path, info)


@dataclass
class CohortLock:
    """A held cohort lock: ``path`` holds this run's record (``token``); :meth:`release` removes it."""

    path: Path
    token: str
    created_folder: bool = False

    def release(self) -> None:
        """Remove the lock if it is still this run's (and the cohort folder if this run created it and it stayed empty)."""
        try:
            info, _ = _read(self.path)
        except CohortLockedError:
            return
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.path.parent.rmdir()  # only when empty: e.g. the checkpoint did not load
            except OSError:
                pass


def take_lock(folder: str | os.PathLike, log: Any = print) -> CohortLock:
    """Create ``<folder>/.cohort.lock`` for this run (the folder too, if missing) and return it.

    A lock of a dead process on this host is taken over, saying so on ``log``.

    Raises:
        CohortLockedError: a live run (or one on another host) holds the lock, or the lock file is
            not a lock record; nothing is written or deleted then.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    token = secrets.token_hex(8)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "proc_start": _proc_start(os.getpid()), "boot_id": _boot_id(), "token": token, "command": _COMMAND}  # fmt: skip
    for _attempt in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info, data = _read(path)
            if info is None:
                continue  # released meanwhile: create it again
            if info["host"] != socket.gethostname() or _alive(info):
                raise _locked_error(path, info) from None
            # the holder has ended: move its lock aside and check it is still the one read (two runs may take over at once)
            aside = folder / f"{LOCK_FILE}.{os.getpid()}.{token}.old"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if aside.read_bytes() != data:  # another run took it over first: put its lock back (same file) and look again
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink()
            (log or (lambda _m: None))(
                f"[hsrdiff] {path}: taking over the lock of pid {info['pid']} (started {info.get('started', '?')}), "
                f"which has ended (a killed run): its finished cases are skipped, an unfinished one is redone"
            )
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return CohortLock(path, token, created_folder=created)
    raise CohortLockedError(f"--out {folder}: could not take the cohort lock {path} (other runs keep taking it); run again")
