from .atomic import atomic_path, atomic_write_text, remove_interrupted_writes, replace_dir
from .paths import unwritable_reason
from .run_lock import RunFolderLocked, RunLock

__all__ = ["RunFolderLocked", "RunLock", "atomic_path", "atomic_write_text", "remove_interrupted_writes", "replace_dir", "unwritable_reason"]
