"""One process per run folder: an exclusive OS lock (``fcntl.flock``) held for a run's lifetime.

Two trainings (or a training and an evaluation) writing into one run folder would overwrite
each other's checkpoints and both "succeed". :class:`RunLock` takes a non-blocking exclusive
``flock`` on ``<run_dir>/.run.lock``: a second process is refused at once, told the PID (and
the command) of the holder. The kernel releases a flock when its holder dies, even by
SIGKILL, so a lock file left behind by a killed run blocks nobody (its stale PID is ignored).

The lock lives on an ``os.open`` file descriptor, which garbage collection never closes: it
is held until :meth:`RunLock.release` (registered with ``atexit``) or process exit.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import shlex
import sys
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderLocked", "RunLock"]

LOCK_NAME = ".run.lock"


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Exclusive lock on a run folder, for the life of this process.

    Args:
        run_dir: the run folder; created (with its parents) when the lock is taken.

    A run that ends having written no file into a run folder that did not exist before
    leaves no folder behind: :meth:`release` removes the folders the lock created when they
    hold nothing but empty folders.

    Example::

        lock = RunLock("runs/lidc").acquire()  # RunFolderLocked: "... is in use by PID 4242 ..."
        ...
        lock.release()  # also done at exit
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _make_folders(self) -> None:
        missing = []
        probe = self.run_dir
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first: the order to remove them in

    def holder(self) -> str:
        """What the lock file says about its holder ("PID 123 (python -m ...)"), or "another process"."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        pid, _, command = text.partition("\n")
        if not pid.isdigit():
            return "another process"
        return f"PID {pid}" + (f" ({command.strip()})" if command.strip() else "")

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderLocked` naming the folder and the holder's PID."""
        if self._fd is not None:
            return self
        self._make_folders()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise RunFolderLocked(
                    f"the run folder {self.run_dir} is in use by {self.holder()}: one training or evaluation "
                    "per run folder at a time. Wait for it to finish (or stop it), or use another folder with "
                    "--run_name NAME / --run_dir DIR."
                ) from None
            # the previous holder may have removed the file between our open and our flock: then
            # we hold a lock on a deleted file that nobody else sees; start again on the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{shlex.join(sys.argv)[:500]}\n".encode())
        self._fd = fd
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Drop the lock and its file; remove the folders :meth:`acquire` created if no file was written there."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can have taken it meanwhile
        finally:
            os.close(fd)
        created, self._created = self._created, []
        for folder in created:  # innermost first
            try:
                if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
                    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                        sub.rmdir()
                    folder.rmdir()
            except OSError:  # another process wrote there meanwhile: leave it
                return
