"""Shared, domain-free utilities: atomic file writes (``kflow.utils.io``) and the pickle-free LMDB record store
(``kflow.utils.store``)."""
from kflow.utils.io import atomic_path, atomic_save, atomic_write_bytes, atomic_write_text
from kflow.utils.store import RecordStore, RecordStoreError, decode_record, encode_record, write_record_store

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text", "atomic_path", "RecordStore",
           "RecordStoreError", "write_record_store", "encode_record", "decode_record"]
