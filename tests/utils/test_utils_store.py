"""The shared LMDB record store: pickle-free round trips, refusals, corrupt and foreign records, atomic builds."""
import os
import pickle

import numpy as np
import pytest

from kflow.utils.store import (RecordStore, RecordStoreError, decode_record, encode_record, record_key,
                               write_record_store)


def _records():
    rng = np.random.default_rng(0)
    yield {"positions": rng.normal(size=(17, 3)).astype(np.float32), "elements": np.arange(5, dtype=np.uint8),
           "name": "ABCDEF01", "count": 17, "energy": -1.25, "flag": True, "missing": None}
    yield {"latents": rng.normal(size=(2, 4, 8, 8)), "labels": np.array([3, 7], dtype=np.int64),
           "big_endian": np.arange(4, dtype=">i4"), "complex": np.array([1 + 2j], dtype=np.complex64),
           "empty": np.zeros((0, 3), dtype=np.float32), "scalar_array": np.array(2.5), "text": np.array(["a", "bc"]),
           "transposed": np.arange(6, dtype=np.int16).reshape(2, 3).T, "np_scalar": np.float32(0.5),
           "np_int": np.int64(9)}


def test_round_trip_of_dtypes_shapes_and_scalars(tmp_path):
    originals = list(_records())
    path = write_record_store(tmp_path / "s.lmdb", iter(originals), {"source": "test", "sizes": [1, 2]})
    store = RecordStore(path)
    assert len(store) == 2 and store.meta == {"source": "test", "sizes": [1, 2]}
    for original, read in zip(originals, store):
        assert list(read) == list(original)
        for name, value in original.items():
            got = read[name]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value), name
                assert got.flags.writeable, name
            else:
                assert got == value and type(got) is type(value.item() if isinstance(value, np.generic) else value)
    with pytest.raises(IndexError):
        store[2]
    again = pickle.loads(pickle.dumps(store))  # picklable for worker processes; reopens lazily
    assert np.array_equal(again[1]["labels"], [3, 7])


def test_encoding_refuses_object_arrays_and_other_values():
    with pytest.raises(TypeError, match="'bad'.*object"):
        encode_record({"bad": np.array([{"a": 1}, None], dtype=object)})
    with pytest.raises(TypeError, match="'nested'"):
        encode_record({"nested": {"a": 1}})
    with pytest.raises(TypeError, match="dict"):
        encode_record([np.zeros(2)])
    header_says_object = encode_record({"x": np.zeros(2)}).replace(b'"<f8"', b'"|O" ')
    with pytest.raises(RecordStoreError, match="k: corrupt record.*object"):
        decode_record(header_says_object, "k")


def test_corrupt_record_error_names_the_folder_and_key(tmp_path):
    import lmdb

    path = write_record_store(tmp_path / "s.lmdb", [{"x": np.arange(10.0)}] * 3)
    env = lmdb.open(str(path), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(1), txn.get(record_key(1))[:-8])  # truncated payload
        txn.put(record_key(2), b"garbage")
    env.close()
    store = RecordStore(path, description="latent cache")
    assert np.array_equal(store[0]["x"], np.arange(10.0))
    with pytest.raises(RecordStoreError, match=r"s\.lmdb: latent cache key 00000001: corrupt record"):
        store[1]
    with pytest.raises(RecordStoreError, match=r"s\.lmdb: latent cache key 00000002: not a kflow record"):
        store[2]


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickled_record_or_metadata_is_rejected_not_executed(tmp_path):
    import lmdb

    exploit = _Exploit()
    exploit.target = str(tmp_path / "pwned")
    path = write_record_store(tmp_path / "s.lmdb", [{"x": np.zeros(1)}])
    env = lmdb.open(str(path), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(0), pickle.dumps({"x": exploit}))
    env.close()
    with pytest.raises(RecordStoreError, match="key 00000000: not a kflow record"):
        RecordStore(path)[0]

    foreign = tmp_path / "foreign.lmdb"  # a store of the old, pickled format
    env = lmdb.open(str(foreign), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", pickle.dumps({"count": 1, "x": exploit}))
        txn.put(record_key(0), pickle.dumps({"x": exploit}))
    env.close()
    with pytest.raises(RecordStoreError, match="foreign.lmdb: .*__meta__.*never unpickled"):
        RecordStore(foreign)
    assert not (tmp_path / "pwned").exists()


def test_missing_store_and_missing_metadata(tmp_path):
    import lmdb

    with pytest.raises(FileNotFoundError, match="nothing: no cluster store"):
        RecordStore(tmp_path / "nothing", description="cluster store")
    env = lmdb.open(str(tmp_path / "partial"), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(0), encode_record({"x": np.zeros(1)}))
    env.close()
    with pytest.raises(RecordStoreError, match="partial: record store has no metadata record"):
        RecordStore(tmp_path / "partial")


def test_exception_mid_build_leaves_nothing_and_keeps_an_old_store(tmp_path):
    def failing():
        yield {"x": np.zeros(2)}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_record_store(tmp_path / "s.lmdb", failing())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="object"):
        write_record_store(tmp_path / "s.lmdb", [{"x": np.array([None])}])
    with pytest.raises(TypeError, match="JSON"):
        write_record_store(tmp_path / "s.lmdb", [{"x": np.zeros(1)}], {"bad": object()})
    assert list(tmp_path.iterdir()) == []

    write_record_store(tmp_path / "s.lmdb", [{"x": np.ones(2)}], {"v": 1})
    with pytest.raises(RuntimeError):
        write_record_store(tmp_path / "s.lmdb", failing(), {"v": 2})
    store = RecordStore(tmp_path / "s.lmdb")
    assert store.meta == {"v": 1} and np.array_equal(store[0]["x"], np.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["s.lmdb"]


def test_rebuild_replaces_the_store_and_meta_can_be_gathered_while_writing(tmp_path):
    path = tmp_path / "s.lmdb"
    old = RecordStore(write_record_store(path, [{"i": 0}]))
    assert old[0] == {"i": 0}
    names = []

    def records():
        for i in range(3):
            names.append(f"item{i}")
            yield encode_record({"i": i}) if i == 1 else {"i": i}  # pre-encoded bytes are accepted

    write_record_store(path, records(), lambda: {"names": names})
    new = RecordStore(path)
    assert len(new) == 3 and new.meta == {"names": ["item0", "item1", "item2"]}
    assert [r["i"] for r in new] == [0, 1, 2]
    with pytest.raises(RecordStoreError, match="rebuilt after this reader opened it"):
        old[0]
