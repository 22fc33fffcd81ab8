"""Small shared utilities: atomic file writes and torch helpers."""
from kflow.utils.io import atomic_save, atomic_write_bytes, atomic_write_text, atomic_path

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text", "atomic_path"]
