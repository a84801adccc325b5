from .atomic import atomic_path, atomic_write_text, replace_dir

__all__ = ["atomic_path", "atomic_write_text", "replace_dir"]
