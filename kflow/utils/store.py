"""An LMDB record store: numbered records (dicts of numpy arrays and plain scalars) plus JSON metadata.

One store format serves every domain (image latents, molecular clusters). A store is an LMDB environment (a
folder). Record ``i`` lives under the key ``b"%08d" % i``; the key ``b"__meta__"`` holds a JSON object with the
format name, its version, the number of records and the caller's metadata.

Records are encoded without pickle, so reading a store never executes code from it:

    MAGIC (8 bytes) | header length (4 bytes, little-endian) | header (UTF-8 JSON) | raw array bytes

The header lists the fields in order: scalars (str, int, float, bool, None) carry their value; arrays carry their
dtype string (byte order included), shape, and the offset and size of their bytes in the payload. Only plain
numeric, boolean and fixed-width string dtypes are accepted (never ``object``). A record without the magic
prefix, with a malformed header or with sizes that do not add up raises ``RecordStoreError`` naming the store
folder and the key.

A store is built into a temporary folder beside its final path and renamed into place only when complete, so an
exception mid-build leaves nothing. Readers open the environment read-only and lazily, once per process (a
DataLoader worker forked from the parent opens its own), and decode one record per access.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from kflow.utils.io import atomic_path, loads_json

__all__ = ["RecordStore", "RecordStoreError", "write_record_store", "encode_record", "decode_record",
           "STORE_FORMAT", "STORE_VERSION"]

STORE_FORMAT = "kflow-record-store"
STORE_VERSION = 1
META_KEY = b"__meta__"
RECORD_MAGIC = b"KFLOWREC"
HEADER_LENGTH_BYTES = 4
ALLOWED_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, fixed-width bytes and unicode; never object
DEFAULT_MAP_SIZE = 1 << 36  # address space reserved for writing (64 GiB); the file grows only with the data
COMMIT_EVERY = 1000  # records per write transaction, so a transaction's dirty pages stay bounded
SCALAR_TYPES = (str, int, float, bool, type(None))


class RecordStoreError(ValueError):
    """A store or record that exists but cannot be used: incomplete, corrupt, foreign or of another version."""


def record_key(index: int) -> bytes:
    """LMDB key of record ``index``."""
    return b"%08d" % index


# ---------------------------------------------------------------------------------------------- record encoding
def _array_dtype(name: str, dtype: np.dtype) -> np.dtype:
    if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.fields is not None:
        raise TypeError(f"field {name!r}: dtype {dtype} cannot be stored (only numeric, bool and fixed-width string "
                        "arrays; object arrays would need pickle)")
    return dtype


def encode_record(record: dict) -> bytes:
    """One record (``{name: numpy array | str | int | float | bool | None}``) -> bytes, without pickle.

    numpy scalars are stored as the equivalent Python scalar. Raises ``TypeError`` naming the field for anything
    else (object arrays, tensors, nested containers).
    """
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a dict of arrays and scalars, got {type(record).__name__}")
    fields, payload, offset = [], [], 0
    for name, value in record.items():
        if not isinstance(name, str):
            raise TypeError(f"field names must be str, got {name!r}")
        if isinstance(value, np.generic) and not isinstance(value, np.str_):
            value = value.item()
        if isinstance(value, np.ndarray):
            dtype = _array_dtype(name, value.dtype)
            data = np.ascontiguousarray(value).tobytes()
            fields.append({"name": name, "dtype": dtype.str, "shape": list(value.shape), "offset": offset,
                           "nbytes": len(data)})
            payload.append(data)
            offset += len(data)
        elif isinstance(value, SCALAR_TYPES):
            fields.append({"name": name, "value": value})
        else:
            raise TypeError(f"field {name!r}: cannot store a {type(value).__name__} (numpy arrays and str, int, "
                            "float, bool or None scalars only)")
    header = json.dumps({"fields": fields}).encode("utf-8")
    return b"".join([RECORD_MAGIC, len(header).to_bytes(HEADER_LENGTH_BYTES, "little"), header, *payload])


def decode_record(blob: bytes, source: str = "record") -> dict:
    """bytes written by ``encode_record`` -> the record (arrays are writable copies). ``source`` names the record
    in errors (e.g. "store/folder: key 00000003"); raises ``RecordStoreError`` for anything else."""
    start = len(RECORD_MAGIC) + HEADER_LENGTH_BYTES
    if blob is None or bytes(blob[:len(RECORD_MAGIC)]) != RECORD_MAGIC or len(blob) < start:
        raise RecordStoreError(f"{source}: not a kflow record (corrupt, or written by another program or an older "
                               "kflow; it is never unpickled); rebuild the store")
    length = int.from_bytes(blob[len(RECORD_MAGIC):start], "little")
    try:
        header = loads_json(bytes(blob[start:start + length]).decode("utf-8"))
        fields = header["fields"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise RecordStoreError(f"{source}: corrupt record header ({err})") from err
    payload = bytearray(blob[start + length:])  # one writable copy; arrays are views into it
    record = {}
    try:
        if not isinstance(fields, list):
            raise TypeError(f"'fields' is a {type(fields).__name__}, not a list")
        for field in fields:
            if not isinstance(field, dict) or not isinstance(field.get("name"), str):
                raise TypeError(f"field entry {str(field)[:80]!r} has no name")
            if "value" in field:
                if not isinstance(field["value"], SCALAR_TYPES):
                    raise TypeError(f"field {field['name']!r}: a {type(field['value']).__name__} is not a scalar")
                record[field["name"]] = field["value"]
                continue
            dtype = _array_dtype(field["name"], np.dtype(field["dtype"]))
            _check_layout(field)
            count = int(np.prod(field["shape"], dtype=np.int64))
            if field["offset"] + field["nbytes"] > len(payload) or count * dtype.itemsize != field["nbytes"]:
                raise ValueError(f"field {field['name']!r} needs {field['nbytes']} bytes at offset {field['offset']} "
                                 f"of a {len(payload)}-byte payload for shape {field['shape']}")
            record[field["name"]] = np.frombuffer(payload, dtype, count, field["offset"]).reshape(field["shape"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise RecordStoreError(f"{source}: corrupt record ({err})") from err
    return record


def _check_layout(field: dict) -> None:
    """Shape, offset and size of an array field must be non-negative integers (a negative count would make
    ``np.frombuffer`` read the whole payload)."""
    shape, offset, nbytes = field.get("shape"), field.get("offset"), field.get("nbytes")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"field {field['name']!r}: shape {shape!r} is not a list of non-negative integers")
    for name, value in (("offset", offset), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"field {field['name']!r}: {name} {value!r} is not a non-negative integer")


# ---------------------------------------------------------------------------------------------- writing
def write_record_store(path: str | os.PathLike, records: Iterable[dict | bytes],
                       meta: dict | Callable[[], dict] | None = None, *, map_size: int = DEFAULT_MAP_SIZE,
                       progress: bool = False, total: int | None = None, description: str = "record store") -> Path:
    """Write ``records`` (dicts, or bytes already made by ``encode_record``, e.g. in worker processes) as a new
    store at ``path``, replacing an old one atomically; returns ``path``.

    ``meta``: JSON-serialisable metadata, or a callable returning it, called after the last record (so metadata
    gathered while the records stream by can be stored). An exception anywhere leaves no folder behind (an old
    store at ``path`` survives).
    """
    import lmdb

    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        # mode 0o666: LMDB's default 0o755 would make data.mdb executable; the umask applies as for any file
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, lock=False, mode=0o666)
        try:
            if progress:
                from tqdm.auto import tqdm

                records = tqdm(records, total=total, desc=f"writing {path.name}", unit="record")
            count = _write_records(env, records)
            user_meta = meta() if callable(meta) else dict(meta or {})
            try:
                blob = json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION, "num_records": count,
                                   "meta": user_meta}).encode("utf-8")
            except (TypeError, ValueError) as err:
                raise TypeError(f"{path}: the {description}'s metadata is not JSON-serialisable ({err})") from err
            with env.begin(write=True) as txn:
                txn.put(META_KEY, blob)
            env.sync()
        finally:
            env.close()
    _close_cached(path)  # a reader in this process still maps the replaced store
    return path


def _write_records(env, records) -> int:
    """Put the records under consecutive keys in bounded transactions; returns how many."""
    count = 0
    txn = env.begin(write=True)
    try:
        for record in records:
            blob = record if isinstance(record, (bytes, bytearray)) else encode_record(record)
            if bytes(blob[:len(RECORD_MAGIC)]) != RECORD_MAGIC:
                raise TypeError(f"record {count}: bytes that encode_record did not make")
            txn.put(record_key(count), bytes(blob))
            count += 1
            if count % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    return count


# ---------------------------------------------------------------------------------------------- reading
_OPEN_ENVS: dict[tuple[str, int], Any] = {}  # (resolved folder, pid) -> read-only environment


def _open_cached(path: Path):
    """The read-only environment of ``path`` for this process (LMDB forbids opening one folder twice in a
    process). An environment inherited through fork belongs to the parent: the child drops its copy and opens its
    own."""
    import lmdb

    folder, pid = str(path.resolve()), os.getpid()
    for key in [k for k in _OPEN_ENVS if k[0] == folder and k[1] != pid]:
        _OPEN_ENVS.pop(key).close()  # unmaps the inherited copy in this process only
    if (folder, pid) not in _OPEN_ENVS:
        _OPEN_ENVS[(folder, pid)] = lmdb.open(folder, readonly=True, lock=False, readahead=False, subdir=True,
                                              max_readers=256)
    return _OPEN_ENVS[(folder, pid)]


def _close_cached(path: Path) -> None:
    env = _OPEN_ENVS.pop((str(path.resolve()), os.getpid()), None)
    if env is not None:
        env.close()


class RecordStore:
    """Read-only random access to a store written by ``write_record_store``.

    ``len(store)`` records; ``store[i]`` decodes record i; ``store.meta`` is the caller's metadata (a dict).
    ``description`` names the store in error messages ("latent cache", "cluster store", ...). Picklable: a copy
    sent to a worker process opens the folder there on first access.

    Raises ``FileNotFoundError`` when ``path`` holds no LMDB environment and ``RecordStoreError`` naming the folder
    when its metadata is missing (an interrupted build or a foreign LMDB), not JSON, or of another format/version.
    """

    def __init__(self, path: str | os.PathLike, description: str = "record store"):
        import lmdb

        self.path, self.description = Path(path), description
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"{self.path}: no {description} (expected an LMDB folder with data.mdb)")
        self._env, self._pid = None, None
        try:
            raw = self._get(META_KEY)
        except lmdb.Error as err:
            raise RecordStoreError(f"{self.path}: cannot open the {description} ({err})") from err
        if raw is None:
            raise RecordStoreError(f"{self.path}: {description} has no metadata record (incomplete build, or an "
                                   "LMDB folder that is not a kflow store)")
        try:
            header = loads_json(raw.decode("utf-8"))
            known = isinstance(header, dict) and header.get("format") == STORE_FORMAT
        except (UnicodeDecodeError, json.JSONDecodeError):
            known = False
        if not known:
            raise RecordStoreError(f"{self.path}: the {description}'s metadata (key __meta__) is not a kflow "
                                   "record-store header (a foreign or older store; it is never unpickled); "
                                   "rebuild it")
        if header.get("version") != STORE_VERSION:
            raise RecordStoreError(f"{self.path}: {description} format version {header.get('version')} is not "
                                   f"{STORE_VERSION}; rebuild it")
        count, meta = header.get("num_records"), header.get("meta")
        if not (isinstance(count, int) and count >= 0 and isinstance(meta, dict)):
            raise RecordStoreError(f"{self.path}: the {description}'s header has no valid num_records / meta "
                                   "(damaged); rebuild it")
        self._num_records, self.meta = count, meta

    def _get(self, key: bytes):
        env = _open_cached(self.path)
        if self._env is None or self._pid != os.getpid():  # first access in this process (or a forked copy)
            self._env, self._pid = env, os.getpid()
        elif env is not self._env:  # write_record_store replaced the folder and closed the old environment
            raise RecordStoreError(f"{self.path}: the {self.description} was rebuilt after this reader opened it; "
                                   "open it again")
        with env.begin() as txn:
            return txn.get(key)

    def __len__(self) -> int:
        return self._num_records

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for a {self.description} of {len(self)}")
        key = record_key(index)
        blob = self._get(key)
        source = f"{self.path}: {self.description} key {key.decode()}"
        if blob is None:
            raise RecordStoreError(f"{source} is missing ({len(self)} records expected; incomplete build?)")
        return decode_record(blob, source)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self):  # the environment is per process: a copy opens its own
        state = dict(self.__dict__)
        state["_env"], state["_pid"] = None, None
        return state

    def __repr__(self):
        return f"RecordStore({str(self.path)!r}, {len(self)} records)"
