"""Storage of the trace model: run.db (SQLite, open it with any SQLite tool) and atomic file writes."""

from gpudoctor.store.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from gpudoctor.store.rundb import MODEL_VERSION, cache_path, is_run_db, load, save

__all__ = [
    "MODEL_VERSION", "save", "load", "is_run_db", "cache_path",
    "atomic_path", "atomic_write_bytes", "atomic_write_text",
]
