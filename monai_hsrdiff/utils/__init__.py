from .atomic import atomic_path, atomic_write_text, remove_interrupted_writes, replace_dir
from .paths import unwritable_reason

__all__ = ["atomic_path", "atomic_write_text", "remove_interrupted_writes", "replace_dir", "unwritable_reason"]
