"""One writer per --out for kflow assemble and kflow crystal: a second concurrent run is refused in one line before
it starts work and the first one's result is kept (two runs once both said "wrote" and one result was lost); the
lock goes on errors and Ctrl-C, and one left by a killed process does not block."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kflow.cli import main
from kflow.molecular.assemble import api
from kflow.molecular.assemble.crystals import predict_crystals
from kflow.utils.io import FolderBusyError, one_writer
from testkit import REPO, SDF, one_error_line


def _lock(out: Path) -> Path:
    return out.parent / f".{out.name}.kflow-lock"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def _holder(out: Path) -> subprocess.Popen:
    """A process that holds ``out``'s writer lock until killed."""
    code = ("import sys, time; from kflow.utils.io import one_writer\n"
            "with one_writer(sys.argv[1], 'kflow assemble'):\n    print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_concurrent_assemble_is_refused_and_the_first_result_kept(tiny_model, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "kflow", "assemble", str(SDF), "--out", str(out), "--model",
                              tiny_model, "--samples", "2", "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(_lock(out), first)
        called = []
        monkeypatch.setattr(api, "_predict", lambda *a, **k: called.append(1))
        assert main(["assemble", str(SDF), "--out", str(out), "--model", tiny_model, "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert "is being written by another run" in line and f"pid {first.pid}" in line and not called
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert "wrote" in stdout and (out / "summary.json").is_file() and not _lock(out).exists()


def test_a_second_crystal_run_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "csp"
    holder = _holder(out)
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("work started")
        monkeypatch.setattr("kflow.molecular.assemble.crystals.read_assembly_input", refuse)
        with pytest.raises(FolderBusyError, match=f"csp is being written by another run \\(pid {holder.pid}"):
            predict_crystals(str(SDF), candidates=2, out=out)
        assert main(["crystal", str(SDF), "--out", str(out), "--candidates", "2", "--no-progress"]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert _lock(out).exists()  # left behind
    with one_writer(out, "kflow assemble"):
        assert str(os.getpid()) in _lock(out).read_text()
    assert not _lock(out).exists()


@pytest.mark.parametrize("failure, status", [(ValueError("bad"), 1), (KeyboardInterrupt(), 130)])
def test_the_lock_goes_on_errors_and_ctrl_c(failure, status, tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def fail(*args, **kwargs):
        assert _lock(out).exists()  # held while working
        raise failure
    monkeypatch.setattr(api, "_predict", fail)
    assert main(["assemble", str(SDF), "--out", str(out), "--model", tiny_model, "--no-progress"]) == status
    assert not _lock(out).exists() and not out.exists()


def test_one_process_may_write_a_folder_it_holds():
    out = Path("/tmp") / f"kflow_reentrant_{os.getpid()}"
    with one_writer(out, "a"):
        with one_writer(out, "a"):
            assert _lock(out).exists()
        assert _lock(out).exists()
    assert not _lock(out).exists()
