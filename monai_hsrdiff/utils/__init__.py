from .atomic import atomic_path, atomic_write_text

__all__ = ["atomic_path", "atomic_write_text"]
