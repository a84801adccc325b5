from .atomic import atomic_path, atomic_write_text, building_dir, remove_interrupted_writes, replace_dir
from .device import device_problem, resolve_device
from .outputs import (
    MARKER_NAME,
    STAMP_KEY,
    OutputFolderError,
    OutputLayout,
    check_replaceable,
    guard_output_path,
    list_entries,
    read_stamp,
    repo_root,
    unexpected_entries,
    write_marker,
)
from .writable import unwritable_reason
from .run_lock import RunFolderLocked, RunLock

__all__ = [
    "MARKER_NAME",
    "STAMP_KEY",
    "OutputFolderError",
    "OutputLayout",
    "RunFolderLocked",
    "RunLock",
    "atomic_path",
    "atomic_write_text",
    "building_dir",
    "check_replaceable",
    "device_problem",
    "guard_output_path",
    "list_entries",
    "read_stamp",
    "remove_interrupted_writes",
    "replace_dir",
    "resolve_device",
    "repo_root",
    "unexpected_entries",
    "unwritable_reason",
    "write_marker",
]
