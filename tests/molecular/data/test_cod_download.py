"""Missing COD-Cluster17 data: a short message saying where the data lives, which files go where, and a command
that checks the layout once the files are placed (and it does)."""
import shlex
from pathlib import Path

import pytest

from kflow.molecular import write_cod_cluster17
from kflow.molecular.data import cod
from kflow.molecular.data.cod import cod_cluster17_ids

from testkit import make_cluster


def missing_message(root, subset="10k"):
    with pytest.raises(FileNotFoundError) as err:
        cod_cluster17_ids(root, subset, download=False)
    return str(err.value)


def test_message_says_where_the_data_lives_and_which_files_go_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("data") / "COD-Cluster17"  # as kflow train's default --data-root gives it
    message = missing_message(root)
    assert "\n" not in message and len(message) < 550  # was ~900 characters
    for needle in ["'chao1224/CrystalFlow'", "folder COD/", "raw/FinalPositions/<id>_cluster16.csv",
                   "raw/InitialPositions/<id>_cluster16_noised.csv", f"under {root}/",
                   "processed_10000/valid_idx.txt"]:
        assert needle in message, needle
    assert "Error" not in message  # no exception names, only what to do


def test_the_check_command_counts_the_clusters_once_placed(tmp_path, capsys):
    root = tmp_path / "COD-Cluster17"
    command = shlex.split(missing_message(root).split("check the layout with: ", 1)[1])
    assert command[:2] == ["python", "-c"]
    for i in range(3):
        write_cod_cluster17(make_cluster(i, atoms=4), root, f"{i:04d}")
    (root / "processed_10000").mkdir()
    (root / "processed_10000" / "valid_idx.txt").write_text("0000\n0001\n0002\n")
    exec(command[2], {})  # what `python -c` runs
    assert capsys.readouterr().out.strip() == "3 clusters"


def test_failed_download_names_no_exception_class(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    class LocalEntryNotFoundError(Exception):
        pass

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError):
        cod_cluster17_ids(tmp_path / "COD-Cluster17", "10k", download=True)
    out = capsys.readouterr().out
    assert cod.COD_HUB_DATASET in out and "LocalEntryNotFoundError" not in out
