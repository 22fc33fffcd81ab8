"""Issue 24, one-line errors: a full disk or a refused permission (OSError) ends a command in one line through the
CLI's one error boundary, damaged store records and study JSON are refused in one line naming the file, and
evaluate_image.py reads and checks its samples before any reference features are computed."""
import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kflow.cli import COMMANDS, main
from kflow.utils.cli import error_line, run_main
from kflow.utils.io import check_saved_budget, read_versioned_json
from kflow.utils.store import RECORD_MAGIC, RecordStoreError, decode_record, encode_record, write_record_store
from testkit import SDF

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/last.pt")


def test_a_full_disk_while_assembling_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    import kflow.molecular.assemble.outputs as outputs

    monkeypatch.setattr(outputs, "plot_clusters", _disk_full)  # the disk fills while the outputs are written
    out = tmp_path / "out"
    assert main(["assemble", str(SDF), "--out", str(out), "--model", tiny_model, "--samples", "1",
                 "--no-progress"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "last.pt" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _disk_full_unnamed(*args, **kwargs):  # what a library's flush or close raises: no file name
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_found_by_a_library_names_what_was_being_written(tiny_model, tmp_path, capsys, monkeypatch):
    import kflow.molecular.assemble.outputs as outputs
    from kflow.molecular.data.store import staged_folder
    from kflow.utils.io import atomic_path, atomic_write_text

    final = tmp_path / "run" / "last.pt"
    with pytest.raises(OSError) as caught:
        with atomic_path(final):
            _disk_full_unnamed()
    assert error_line(caught.value).startswith(f"error: {final}: No space left on device")  # was no file at all
    with pytest.raises(OSError) as caught:
        with staged_folder(tmp_path / "built"):
            _disk_full_unnamed()
    assert caught.value.filename == str(tmp_path / "built") and not (tmp_path / "built").exists()
    with pytest.raises(OSError) as caught:  # a file inside the staging folder is named where it was going
        with staged_folder(tmp_path / "built") as stage:
            raise OSError(errno.ENOSPC, "No space left on device", str(stage / "raw" / "a.csv"))
    assert caught.value.filename == str(tmp_path / "built" / "raw" / "a.csv")  # was .built.build-*/built/raw/a.csv
    with pytest.raises(OSError) as caught:
        with atomic_path(final) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert caught.value.filename == str(final)  # was .last.pt.tmp-*
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(OSError) as caught:  # the rename onto a folder
        atomic_write_text(tmp_path / "a_folder", "x")
    assert caught.value.filename == str(tmp_path / "a_folder")  # was .a_folder.tmp-*: Is a directory
    monkeypatch.setattr(outputs, "plot_clusters", _disk_full_unnamed)
    out = tmp_path / "out"
    assert main(["assemble", str(SDF), "--out", str(out), "--model", tiny_model, "--samples", "1",
                 "--no-progress"]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith(f"error: {out}: No space left on device")


class _FullDisk:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        _disk_full_unnamed()


def test_a_full_disk_while_logging_a_training_names_the_log(tmp_path, monkeypatch):
    import builtins

    import kflow.core.training.loop as training
    from testkit import make_trainer

    real_open = builtins.open
    monkeypatch.setattr(training, "open", lambda path, mode="r", *a, **k: _FullDisk() if "a" in mode
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(OSError) as caught:
        make_trainer(tmp_path, max_steps=2).fit()
    assert error_line(caught.value).startswith(f"error: {tmp_path / 'metrics.jsonl'}: No space left on device")


def test_every_command_reports_os_errors_in_one_line(capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, "train", ("test_error_lines", "_disk_full", "fails"))
    assert main(["train"]) == 1
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: _disk_full())
    assert "No space left on device" in _one_error_line(str(exit_.value.code))
    denied = PermissionError(errno.EACCES, "Permission denied", "/shared/run")
    assert error_line(denied) == "error: /shared/run: Permission denied"
    assert error_line(MemoryError()).startswith("error: out of memory")


def _cluster_record(**changes):
    record = {"atomic_numbers": np.ones(6, np.uint8), "molecule_index": np.repeat(np.arange(2), 3).astype(np.uint8),
              "initial_positions": np.zeros((6, 3), np.float32), "final_positions": np.zeros((6, 3), np.float32),
              "name": "c", "crystal": "c"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize("changes, problem", [
    ({"final_positions": None}, "'final_positions' is missing"),
    ({"final_positions": np.zeros((5, 3), np.float32)}, "shape"),
    ({"initial_positions": np.zeros(18, np.float32)}, "dimension"),
    ({"name": 7}, "'name' is not a string"),
])
def test_malformed_cluster_records_are_refused_in_one_line(tmp_path, changes, problem):
    from kflow.molecular.data.store import CLUSTER_STORE_KIND, CLUSTER_STORE_VERSION, ClusterStore

    meta = {"kind": CLUSTER_STORE_KIND, "version": CLUSTER_STORE_VERSION, "count": 1, "names": ["c"],
            "crystals": ["c"]}
    path = write_record_store(tmp_path / "store", [_cluster_record(**changes)], meta)
    with pytest.raises(RecordStoreError, match=f"store: cluster 0 .*{problem}"):
        ClusterStore(path)[0]


def _with_header(header: dict, payload: bytes = b"\0" * 8) -> bytes:
    text = json.dumps(header).encode()
    return RECORD_MAGIC + len(text).to_bytes(4, "little") + text + payload


@pytest.mark.parametrize("header", [
    {"fields": 5}, {"fields": ["x"]}, {"fields": [{"name": "a", "value": [1, 2]}]},
    {"fields": [{"name": "a", "dtype": "<f8", "shape": [-1], "offset": 0, "nbytes": -8}]},
    {"fields": [{"name": "a", "dtype": "<f8", "shape": ["1"], "offset": 0, "nbytes": 8}]},
    {"fields": [{"name": "a", "dtype": "<f8", "shape": [1]}]},
])
def test_records_with_headers_of_the_wrong_shape_are_refused(header):
    with pytest.raises(RecordStoreError, match="store X: corrupt record"):
        decode_record(_with_header(header), "store X")
    assert decode_record(encode_record({"a": np.ones(1)}))["a"].tolist() == [1.0]


def test_study_results_of_the_wrong_shape_are_refused_in_one_line(tmp_path):
    from kflow.molecular.study import StudyBudget

    budget = StudyBudget()
    path = tmp_path / "cell.json"
    numeric = next(f for f in vars(budget) if isinstance(getattr(budget, f), (int, float))
                   and not isinstance(getattr(budget, f), bool))
    with pytest.raises(ValueError, match=f"cell.json: budget field '{numeric}' is a list where a number belongs"):
        check_saved_budget(path, {"budget": {numeric: [1, 2]}}, budget)
    with pytest.raises(ValueError, match="cell.json: the saved budget is a list"):
        check_saved_budget(path, {"budget": [1, 2]}, budget)
    path.write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than the parser's recursion limit
    assert read_versioned_json(path, 1) is None


DEEP = "[" * 100_000 + "]" * 100_000  # nesting deeper than the JSON parser's recursion limit


def test_deeply_nested_json_anywhere_is_a_damaged_file_not_a_traceback(tmp_path, capsys):
    from kflow.core.training import RUN_LOCK
    from kflow.molecular.data.store import CLUSTER_STORE_KIND, CLUSTER_STORE_VERSION, ClusterStore
    from kflow.utils.plots import read_metrics_log
    from testkit import make_trainer

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_LOCK).write_text(DEEP)  # a damaged lock names no live holder: stale
    assert make_trainer(tmp_path / "run", max_steps=2).fit()["step"] == 2  # was a RecursionError traceback
    (tmp_path / "run" / "metrics.jsonl").write_text(DEEP + "\n" + '{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 1: not JSON"):
        read_metrics_log(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 1  # kflow plot: one line
    assert "line 1: not JSON" in _one_error_line(capsys.readouterr().err)
    assert make_trainer(tmp_path / "run", max_steps=4).fit(resume=True)["step"] == 4  # the damaged line is dropped
    assert DEEP not in (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RecordStoreError, match="corrupt record header"):
        decode_record(RECORD_MAGIC + len(DEEP).to_bytes(4, "little") + DEEP.encode())
    meta = {"kind": CLUSTER_STORE_KIND, "version": CLUSTER_STORE_VERSION, "count": 2, "names": ["c", "d"],
            "crystals": ["c", "d"]}
    path = write_record_store(tmp_path / "store", [_cluster_record(info=DEEP), _cluster_record(info="{oops")], meta)
    for i in range(2):
        with pytest.raises(RecordStoreError, match=f"store: cluster {i} .*'info' is not a JSON object"):
            ClusterStore(path)[i]
    import lmdb

    from kflow.molecular.data.store import close_store

    close_store(path)
    with lmdb.open(str(path), subdir=True, lock=False) as env, env.begin(write=True) as txn:
        txn.put(b"__meta__", DEEP.encode())
    with pytest.raises(RecordStoreError, match="not a kflow record-store header"):
        ClusterStore(path)


def test_evaluate_image_rejects_bad_samples_before_any_features(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import evaluate_image
    finally:
        sys.path.remove(str(REPO / "scripts"))
    monkeypatch.setattr(evaluate_image, "evaluate_images", lambda *a, **k: pytest.fail("features computed first"))
    bad = {"not_npz": b"not a zip", "objects": None}
    (tmp_path / "not_npz.npz").write_bytes(bad["not_npz"])
    np.savez(tmp_path / "objects.npz", images=np.array([{"x": 1}], dtype=object))
    np.savez(tmp_path / "nan.npz", images=np.full((2, 1, 4, 4), np.nan, np.float32))
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 1, 4, 4), np.float32), labels=np.zeros(3, np.int64))
    for name in ("not_npz", "objects", "nan", "labels", "missing"):
        path = tmp_path / f"{name}.npz"
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda: evaluate_image.main(["--samples", str(path)]))
        line = _one_error_line(str(exit_.value.code))
        assert str(path) in line
        if name == "not_npz":  # was "This file contains pickled (object) data", about a text file
            assert "not a zip archive" in line and "pickle" not in line
