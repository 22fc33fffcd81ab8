"""Issue 24, training: a run folder is readable by colleagues (umask), has one writer (lock file with pid and host,
stale locks recognised), resumes only onto the same seed and data (or records what it was told to accept),
cleans the temporary files a kill left, and its damaged-checkpoint hint names a form the parser accepts."""
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch import nn

from kflow.core.training import RUN_LOCK, ConfigMismatchError, Resume, RunBusyError, Trainer, load_checkpoint
from kflow.molecular.commands import train_parser
from testkit import ToyData, collate, make_trainer, mse, pyxtal_clusters


def _trainer_on(tmp_path, dataset, max_steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    return Trainer(model, mse, dataset, collate_fn=collate, batch_size=8, lr=1e-2, max_steps=max_steps,
                   out_dir=tmp_path, config={"width": 16}, checkpoint_every=5, progress=False, device="cpu")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_run_folder_is_readable_by_others_under_umask_022(tmp_path, umask_022):
    make_trainer(tmp_path / "run", max_steps=5).fit()
    modes = _modes(tmp_path / "run")
    assert {"config.json", "metrics.csv", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/step_0000005.pt"} \
        <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / "run" / name).is_dir() else 0o644)}
    assert not wrong, wrong  # mkstemp's private 0600 / mkdtemp's 0700 used to survive the rename


def test_a_second_training_of_a_busy_folder_is_refused(tmp_path):
    attempts = []

    def second_training(model, step):  # runs while the first training holds the folder
        with pytest.raises(RunBusyError, match=rf"pid {os.getpid()} on {re.escape(socket.gethostname())}"):
            make_trainer(tmp_path, max_steps=2).fit(resume=True)
        attempts.append(step)
        assert (tmp_path / RUN_LOCK).exists()
        return {}

    make_trainer(tmp_path, max_steps=4, eval_fn=second_training, eval_every=2).fit()
    assert attempts == [2, 4]
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows)  # one writer: no interleaved rows
    assert not (tmp_path / RUN_LOCK).exists()  # released at the end


def _lock_of(pid, host=None):
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "then"})


def test_a_lock_of_a_live_process_refuses_and_a_dead_ones_lock_is_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / RUN_LOCK).write_text(_lock_of(holder.pid))
        with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
            make_trainer(tmp_path, max_steps=2).fit()
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert make_trainer(tmp_path, max_steps=2).fit()["step"] == 2  # the holder died: its lock is stale
    assert not (tmp_path / RUN_LOCK).exists()


def test_a_lock_held_on_another_host_is_respected(tmp_path):
    (tmp_path / RUN_LOCK).write_text(_lock_of(1, host="other-machine"))
    with pytest.raises(RunBusyError, match="other-machine.*remove"):
        make_trainer(tmp_path, max_steps=2).fit()


def test_resume_with_another_seed_is_refused_unless_accepted_and_recorded(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigMismatchError, match="seed: checkpoint 0 vs now 1"):
        make_trainer(tmp_path, max_steps=6, seed=1).fit(resume=True)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.warns(UserWarning, match="accepted"):
        summary = make_trainer(tmp_path, max_steps=6, seed=1).fit(resume=Resume(True, accept_changes=True))
    assert summary["resumed_from"] == 4 and summary["step"] == 6
    recorded = json.loads((tmp_path / "config.json").read_text())["accepted_changes"]
    assert recorded == [{"step": 4, "changes": ["seed: checkpoint 0 vs now 1"]}]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["accepted_changes"] == recorded
    make_trainer(tmp_path, max_steps=8, seed=1).fit(resume=True)  # the accepted seed is the run's seed now


class _IdentifiedData(ToyData):
    def __init__(self, key, preset):
        super().__init__()
        self.identity = {"content_key": key, "start_preset": preset}


def test_resume_onto_other_data_or_another_start_preset_is_refused(tmp_path):
    _trainer_on(tmp_path, _IdentifiedData("abc", "mild"), 4).fit()
    with pytest.raises(ConfigMismatchError, match="content_key: checkpoint 'abc' vs now 'xyz'"):
        _trainer_on(tmp_path, _IdentifiedData("xyz", "mild"), 6).fit(resume=True)
    with pytest.raises(ConfigMismatchError, match="start_preset: checkpoint 'mild' vs now 'hard'"):
        _trainer_on(tmp_path, _IdentifiedData("abc", "hard"), 6).fit(resume=True)
    assert _trainer_on(tmp_path, _IdentifiedData("abc", "mild"), 6).fit(resume=True)["step"] == 6


def test_cluster_store_identity_follows_its_content_and_preset(tmp_path):
    from kflow.molecular.data.store import ClusterStore

    class Meta(ClusterStore):
        def __init__(self, meta):
            self.meta = meta

    built = Meta({"build_key": "k1", "build_kwargs": {"noise": "hard"}}).identity
    assert built == {"content_key": "k1", "start_preset": "hard"}
    assert Meta({"build_key": "k1", "build_kwargs": {"noise": {"name": "mild"}}}).identity["start_preset"] == "mild"
    plain = Meta({"names": ["a", "b"], "crystals": ["a", "b"]}).identity
    assert plain["content_key"] != Meta({"names": ["a", "c"], "crystals": ["a", "c"]}).identity["content_key"]


def test_stale_temporary_checkpoints_are_removed_on_the_next_save(tmp_path):
    make_trainer(tmp_path, max_steps=5).fit()
    folder = tmp_path / "checkpoints"
    leftovers = [folder / ".step_0000010.pt.tmp-k1ll3d", folder / ".last.pt.tmp-abc123"]
    for tmp in leftovers:
        tmp.write_bytes(b"half a checkpoint")  # what kill -9 during torch.save leaves
    make_trainer(tmp_path, max_steps=10).fit(resume=True)
    assert not any(tmp.exists() for tmp in leftovers)
    assert load_checkpoint(folder / "last.pt")["step"] == 10


def test_the_damaged_checkpoint_hint_names_a_form_the_parser_accepts(tmp_path):
    make_trainer(tmp_path, max_steps=10).fit()
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(Exception) as caught:
        load_checkpoint(last)
    hinted = ["--resume", re.search(r"--resume (\S+?)[,)]", str(caught.value)).group(1)]
    args = train_parser().parse_args(hinted)  # was `--resume PATH` while --resume took no value
    assert args.resume == str(tmp_path / "checkpoints" / "step_0000010.pt")
    summary = make_trainer(tmp_path, max_steps=12).fit(resume=args.resume)
    assert summary["resumed_from"] == 10 and torch.load(last, weights_only=True)["step"] == 12


def test_accept_changes_is_folded_into_resume_and_needs_it():
    assert train_parser().parse_args(["--resume", "--accept-changes"]).resume == Resume(True, True)
    assert train_parser().parse_args(["--resume", "x.pt"]).resume == "x.pt"
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--accept-changes"])


def test_training_into_a_file_or_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        make_trainer(tmp_path / "file", max_steps=2)
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    real_access = os.access  # root may write anywhere: say what an ordinary user would be told
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    with pytest.raises(ValueError, match="permission denied"):
        make_trainer(read_only / "run", max_steps=2)


# ------------------------------------------------------------------------------------------ through `kflow train`
SMALL_NET = ["--hidden-irreps", "8x0e + 2x1o + 2x1e", "--molecule-layers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """Two small cluster stores of different pyxtal crystals."""
    from kflow.molecular import write_cluster_store

    root, clusters = tmp_path_factory.mktemp("stores"), pyxtal_clusters(16)
    # the same size: a resume onto b is refused for its content, not for a changed dataset_size
    return (str(write_cluster_store(clusters[:8], root / "a")), str(write_cluster_store(clusters[8:], root / "b")))


def test_kflow_train_refuses_a_busy_folder_and_a_resume_onto_other_seed_or_data(two_stores, tmp_path, capsys):
    from kflow.cli import main

    run = tmp_path / "run"
    train = ["train", "--steps", "2", "--batch-size", "2", "--out", str(run), *SMALL_NET]
    assert main([*train, "--dataset", two_stores[0]]) == 0
    capsys.readouterr()
    refusals = {"--seed 1": ["--seed", "1"], "content_key": ["--dataset", two_stores[1]]}
    for expected, change in refusals.items():
        args = [*train, "--dataset", two_stores[0], "--resume", *change]
        args[args.index("--steps") + 1] = "3"
        assert main(args) == 1
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith("error: ") and expected.split()[-1] in line, line
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # nothing trained
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RUN_LOCK).write_text(_lock_of(holder.pid))
        assert main([*train, "--dataset", two_stores[0], "--resume"]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    args = [*train, "--dataset", two_stores[0], "--resume", "--accept-changes", "--seed", "1"]
    args[args.index("--steps") + 1] = "3"
    with pytest.warns(UserWarning, match="accepted"):
        assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["accepted_changes"][0]["step"] == 2


def test_kflow_train_checks_its_run_folder_before_reading_any_data(tmp_path, capsys, monkeypatch):
    import kflow.molecular.workflow as workflow
    from kflow.cli import main

    monkeypatch.setattr(workflow, "load_assembly_dataset", lambda *a, **k: pytest.fail("data read first"))
    (tmp_path / "file").write_text("not a folder")
    assert main(["train", "--dataset", "demo", "--out", str(tmp_path / "file"), "--no-progress"]) == 1
    assert "is a file" in capsys.readouterr().err  # was said after the data set had been built
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / RUN_LOCK).write_text(_lock_of(holder.pid))
        assert main(["train", "--dataset", "demo", "--out", str(run), "--resume", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
