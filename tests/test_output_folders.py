"""Issue 24, output folders: a folder a command replaces as a whole is refused if it holds anything the command did
not write (dot-files included: `--out my_repo/` used to wipe `my_repo/.git`), `--out .`, a file or a place that is
not writable end in one line, and what is written gets the permissions the umask gives (0644 / 0755 under 022)."""
import os
import stat
import sys
from pathlib import Path

import pytest

from kflow.cli import main
from kflow.molecular.data.sources import build_clusters_from_files
from kflow.utils.io import atomic_write_text, check_replaceable_folder, foreign_entries

REPO = Path(__file__).resolve().parents[1]
SDF, CIF = REPO / "data" / "examples" / "GASXON.sdf", REPO / "data" / "examples" / "GASXON.cif"


def _repo_like(folder: Path) -> dict:
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".env").write_text("KEY=1\n")
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_assemble_never_replaces_a_folder_holding_hidden_files(tiny_model, tmp_path, capsys):
    repo = tmp_path / "my_repo"
    before = _repo_like(repo)
    assert main(["assemble", str(SDF), "--out", str(repo), "--model", tiny_model, "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert ".git/" in line and ".env" in line
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


def test_assemble_refuses_the_current_folder_a_file_and_a_read_only_place(tiny_model, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):  # the current folder, or one above it
        assert main(["assemble", str(SDF), "--out", out, "--model", tiny_model, "--no-progress"]) == 1
        assert "current folder" in _one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["assemble", str(SDF), "--out", str(tmp_path / "file"), "--model", tiny_model]) == 1
    assert "is a file" in _one_error_line(capsys)
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    real_access = os.access  # root may write anywhere: say what an ordinary user would be told
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    assert main(["assemble", str(SDF), "--out", str(read_only / "x"), "--model", tiny_model]) == 1
    assert "permission denied" in _one_error_line(capsys)


def test_assemble_outputs_follow_the_umask_and_can_be_replaced_by_a_rerun(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "gasxon"
        for _ in range(2):  # a rerun replaces its own earlier output
            assert main(["assemble", str(SDF), "--out", str(out), "--model", tiny_model, "--samples", "1",
                         "--no-progress"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert modes and set(modes.values()) == {0o644}, modes


def test_cluster_build_never_replaces_a_folder_holding_hidden_files(tmp_path, monkeypatch):
    out = tmp_path / "built"
    before = _repo_like(out)
    with pytest.raises(ValueError, match=r"\.env.*\.git/"):
        build_clusters_from_files([CIF], out, draws_per_crystal=1, num_workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current folder"):
        build_clusters_from_files([CIF], ".", draws_per_crystal=1, num_workers=1, progress=False)


def test_build_clusters_script_refuses_in_one_line(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_clusters
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path / "built"
    _repo_like(out)
    assert build_clusters.main([str(CIF), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".git/" in err[0]


def test_a_rebuild_replaces_only_what_a_build_wrote(tmp_path):
    out = tmp_path / "built"
    build_clusters_from_files([CIF], out, draws_per_crystal=1, num_workers=1, progress=False)
    assert foreign_entries(out, __import__("kflow.molecular.data.sources", fromlist=["x"]).BUILD_FOLDER_LAYOUT) == []
    build_clusters_from_files([CIF], out, draws_per_crystal=1, num_workers=1, progress=False)  # accepted
    (out / "raw" / "FinalPositions" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="raw/FinalPositions/notes.txt"):
        build_clusters_from_files([CIF], out, draws_per_crystal=1, num_workers=1, progress=False)


def test_foreign_entries_sees_hidden_files_links_and_wrong_kinds(tmp_path):
    (tmp_path / "summary.json").mkdir()  # a folder where a file belongs
    (tmp_path / ".hidden").write_text("")
    (tmp_path / "pred.pdb").symlink_to("/etc/passwd")
    expected = {"summary.json": None, "pred.pdb": None}
    assert foreign_entries(tmp_path, expected) == [".hidden", "pred.pdb", "summary.json/"]
    with pytest.raises(ValueError, match="did not write"):
        check_replaceable_folder(tmp_path, expected, "a test")


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_a_name_with_a_newline_gives_extxyz_files_that_read_back(tiny_model, tmp_path):
    import ase.db
    import ase.io

    from kflow.molecular import read_crystals

    db = tmp_path / "rows.db"
    with ase.db.connect(str(db)) as con:
        con.write(next(read_crystals(CIF))[1], data={"name": 'GAS"XON\nINJECTED=1'})
    out = tmp_path / "out"
    assert main(["assemble", str(db), "--out", str(out), "--model", tiny_model, "--samples", "2",
                 "--no-progress"]) == 0
    for name in ("pred.extxyz", "start.extxyz", "truth.extxyz", "samples.extxyz"):
        frames = ase.io.read(out / name, index=":")  # a raw newline in the comment line made this fail
        assert "INJECTED" not in frames[0].info and "\n" not in frames[0].info["name"]


def test_sample_and_evaluate_check_their_output_files_before_any_work(tmp_path, capsys, monkeypatch):
    import kflow.molecular.artifacts as artifacts

    monkeypatch.setattr(artifacts, "load_assembly_model", lambda *a, **k: pytest.fail("model loaded first"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    real_access = os.access  # root may write anywhere: say what an ordinary user would be told
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    cases = {"folder": "is a folder", "file/p.npz": "is a file", "ro/p.npz": "permission denied"}
    for out, expected in cases.items():  # each was found after minutes of sampling, naming a temporary file
        assert main(["sample", "--checkpoint", "x.pt", "--out", str(tmp_path / out), "--no-progress"]) == 1
        assert expected in _one_error_line(capsys)
    assert main(["sample", "--checkpoint", "x.pt", "--out", str(tmp_path / "p.npz"), "--extxyz-dir",
                 str(tmp_path / "file"), "--no-progress"]) == 1
    assert "--extxyz-dir" in _one_error_line(capsys)
    assert main(["evaluate", "--predictions", str(tmp_path / "p.npz"), "--json", str(tmp_path / "folder"),
                 "--no-progress"]) == 1
    assert "--json" in _one_error_line(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for out, expected in {**cases, ".": "is a folder"}.items():  # named a temporary file (.run.tmp-*: Is a directory)
        assert main(["plot", str(run), "--out", str(tmp_path / out)]) == 1
        line = _one_error_line(capsys)
        assert expected in line and ".tmp-" not in line
