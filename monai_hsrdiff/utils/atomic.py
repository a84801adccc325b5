"""Atomic file output: write under a temporary name in the target folder, rename when complete.

A reader (or a resumed run) therefore sees either the previous file or the complete new
one, never a half-written file that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from monai_hsrdiff.errors import list_entries

__all__ = ["atomic_path", "atomic_write_text", "building_dir", "remove_interrupted_writes", "replace_dir"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    ``suffix`` defaults to the target's suffix, so writers that pick a format from the
    extension (NumPy, SimpleITK, nibabel) still see the right one. The file gets the mode of the
    file it replaces, or, when there was none, that of a plain ``open(path, "w")`` (0o666 less
    the umask): ``mkstemp`` creates 0o600, which would hide results from a shared folder's group.

    Example::

        with atomic_path("out/item.npz") as tmp:
            np.savez_compressed(tmp, image=image)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _replacing_mode(path, 0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter before Python 3.13)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replacing_mode(final: Path, fresh: int) -> int:
    """The permission bits for what replaces ``final``: ``final``'s own, or ``fresh`` less the umask."""
    return stat.S_IMODE(final.stat().st_mode) if final.exists() else fresh & ~_umask()


def replace_dir(
    tmp: str | os.PathLike,
    final: str | os.PathLike,
    replace: bool = True,
    check: Callable[[Path], Sequence[str]] | None = None,
) -> Path:
    """Swap the complete folder ``tmp`` in as ``final`` and return ``final``.

    With ``replace=False`` (a command run without ``--overwrite``) ``final`` may only be absent or
    empty, checked at the swap itself: ``rename`` onto a non-empty folder fails atomically, so
    one that another process filled while this one was building is kept and ``FileExistsError``
    raised (the caller's build folder is then dropped, see :func:`building_dir`).

    An existing ``final`` is first renamed into a hidden ``.<name>.*.old`` folder beside it,
    then deleted, so a reader sees the old folder or the new one. ``check`` (``--overwrite``'s
    rule, e.g. ``lambda p: unexpected_entries(p, layout)``) is asked again about the parked
    folder, whose contents no process can add to by its path any more: entries it names (put
    there after the command's first check) make the old folder go back in place untouched and
    raise ``FileExistsError``. ``tmp`` must be on the same
    file system (create it beside ``final``). A crash between the two renames leaves no
    ``final``, which every caller treats as "not finished yet".

    The new ``final`` gets the permission bits of the folder it replaces, or, when there was
    none, those of a folder made with ``mkdir`` (0o777 less the umask): ``mkdtemp`` creates
    ``tmp`` as 0o700, which would silently lock a shared (e.g. 0o750) results folder away from
    its group. ``final`` itself is replaced, so pass a symbolic link's target to write through it.
    """
    tmp, final = Path(tmp), Path(final)
    os.chmod(tmp, _replacing_mode(final, 0o777))
    if not replace:
        try:
            os.rename(tmp, final)  # replaces an empty folder, never a filled one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(
                f"{final} was filled by another process while this one was writing it: nothing there was replaced "
                "and this run's result is discarded (run again with --overwrite to replace it, or choose another folder)"
            ) from e
        return final
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        foreign = list(check(old / final.name)) if check is not None else []
        if foreign:
            _restore(old, final, foreign)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def _restore(old: Path, final: Path, foreign: Sequence[str]) -> None:
    """Put the parked ``old / final.name`` back as ``final`` and raise: it gained entries not ours."""
    try:
        os.rename(old / final.name, final)
        where = f"{final} is as it was"
    except OSError:  # someone made a new non-empty final meanwhile: keep both, say where the old one is
        where = f"the folder is kept, moved to {old / final.name}"
    else:
        shutil.rmtree(old, ignore_errors=True)
    raise FileExistsError(
        f"{final} gained entries that this command did not write while it ran ({list_entries(foreign)}): nothing was replaced "
        f"and this run's result is discarded ({where}); move those entries away, or choose another folder"
    )


@contextlib.contextmanager
def building_dir(final: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """A new hidden folder ``.<name>.XXXXXXXX.<suffix>`` beside ``final`` to build it in, locked.

    The folder is held under an exclusive ``flock`` while the block runs (the kernel drops it when
    the process dies), so :func:`remove_interrupted_writes` in another process writing the same
    ``final`` leaves a running build alone and removes only a killed one's. It is made under a
    name that function does not match and renamed once locked, so no cleaner sees it unlocked.
    Removed if the block raises; renaming it into place (:func:`replace_dir`) is the block's job.

    Example::

        with building_dir("data/demo_lidc", "tmp") as tmp:
            write_items(tmp)
            replace_dir(tmp, "data/demo_lidc")
    """
    final = Path(final)
    fresh = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".{suffix}~", dir=final.parent))
    fd = os.open(fresh, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: unlocked, as before
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp = fresh.with_name(fresh.name[:-1])
        os.rename(fresh, tmp)  # mkdtemp's random part keeps the name unique; the lock follows the inode
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)


def _held_by_a_running_write(path: Path) -> bool:
    """True when another process holds ``path``'s :func:`building_dir` lock (a live write)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock here: nothing to tell a running write by
        return False
    finally:
        os.close(fd)  # releases the probe's lock
    return False


def remove_interrupted_writes(
    final: str | os.PathLike, suffixes: Sequence[str], log: Callable[[str], None] | None = print
) -> list[Path]:
    """Delete the hidden ``.<name>.*.<suffix>`` siblings of ``final`` that a killed write left.

    Folder writers here build ``final`` under such a name (``mkdtemp(prefix=".<name>.")``) and
    :func:`replace_dir` parks the replaced folder in ``.<name>.*.old``; a kill leaves them behind,
    hidden but taking space. They are never a result (``final`` itself is complete or absent),
    so the next run of the same writer removes them, saying so. A folder that a running write
    holds (:func:`building_dir`'s lock: another process building the same ``final`` right now)
    is left alone. Returns what was removed.
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for suffix in suffixes:
        for stale in sorted(final.parent.glob(f".{glob.escape(final.name)}.*.{suffix}")):
            if stale.is_dir() and _held_by_a_running_write(stale):
                if log is not None:
                    log(f"[hsrdiff] leaving {stale} alone: another running process is writing {final.name} there")
                continue
            if log is not None:
                log(f"[hsrdiff] removing {stale}: left by an interrupted write of {final.name}")
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed
