"""Trainer safety: files from others are never executed, checkpoints survive damage to one file, a fresh run never
overwrites another, arguments are checked, and deterministic mode gives bit-identical runs and resumes."""
import os

import pytest
import torch

from kflow.core.training import CheckpointError, RunExistsError, Trainer, load_checkpoint
from testkit import make_trainer


class _PlantsAFile:
    """Unpickling this object would create the marker file: proof that a loader executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "kflow-checkpoint", "payload": _PlantsAFile(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)
    assert not marker.exists()
    from kflow.molecular.artifacts import load_assembly_model
    from kflow.vision.autoencoders import load_autoencoder

    with pytest.raises(CheckpointError):
        load_assembly_model(evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_autoencoder(evil)
    assert not marker.exists()


def test_last_checkpoint_is_an_independent_copy_and_damage_points_to_an_intact_one(tmp_path):
    make_trainer(tmp_path, max_steps=10).fit()
    folder = tmp_path / "checkpoints"
    last, newest = folder / "last.pt", folder / "step_0000010.pt"
    assert os.stat(last).st_ino != os.stat(newest).st_ino and last.read_bytes() == newest.read_bytes()
    last.write_bytes(last.read_bytes()[:300])  # truncated by a full disk, say
    assert load_checkpoint(newest)["step"] == 10  # the step file is untouched
    with pytest.raises(CheckpointError, match="step_0000010.pt"):
        load_checkpoint(last)
    newest.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_0000005.pt"):
        load_checkpoint(last)


def test_fresh_run_never_overwrites_an_earlier_one(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        make_trainer(tmp_path, max_steps=4).fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    summary = make_trainer(tmp_path, max_steps=2, overwrite=True).fit()
    assert summary["step"] == 2 and summary["steps_run"] == 2 and summary["resumed_from"] is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_0000002.pt"]


def test_resumed_run_reports_what_it_ran_and_warns_about_a_changed_schedule(tmp_path):
    make_trainer(tmp_path, max_steps=5).fit()
    with pytest.warns(UserWarning, match="planned for 5 steps"):
        summary = make_trainer(tmp_path, max_steps=8).fit(resume=True)
    assert summary["resumed_from"] == 5 and summary["steps_run"] == 3 and summary["step"] == 8


def test_a_constant_lr_run_extended_by_resuming_is_the_longer_run(tmp_path):
    import warnings

    long = make_trainer(tmp_path / "long", max_steps=8, min_lr_ratio=1.0, warmup_steps=2)
    long.fit()
    make_trainer(tmp_path / "short", max_steps=5, min_lr_ratio=1.0, warmup_steps=2).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the LR does not depend on the planned length
        extended = make_trainer(tmp_path / "short", max_steps=8, min_lr_ratio=1.0, warmup_steps=2)
        extended.fit(resume=True)
    for a, b in zip(long.model.state_dict().values(), extended.model.state_dict().values()):
        assert torch.equal(a, b)
    # the default cosine decay does depend on it: the same extension warns and ends elsewhere
    make_trainer(tmp_path / "cosine", max_steps=5, warmup_steps=2).fit()
    with pytest.warns(UserWarning, match="planned for 5 steps"):
        make_trainer(tmp_path / "cosine", max_steps=8, warmup_steps=2).fit(resume=True)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(max_steps=0), dict(max_steps=-1), dict(checkpoint_every=0),
                                 dict(lr=0.0), dict(log_every=0)])
def test_nonsense_arguments_are_refused(tmp_path, bad):
    from testkit import ToyData, collate, mse

    name = next(iter(bad))
    args = {"batch_size": 8, "lr": 1e-2, "max_steps": 5, "checkpoint_every": 5, "log_every": 2, **bad}
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        Trainer(torch.nn.Linear(4, 1), mse, ToyData(), collate_fn=collate, out_dir=tmp_path, progress=False, **args)
    assert not (tmp_path / "checkpoints").exists()


def test_deterministic_runs_and_resumes_are_bit_identical(tmp_path):
    """The assembly network (scatter sums over edges) under deterministic mode with the suite's 2 threads: two
    runs and a run interrupted after its first checkpoint and resumed end with identical weights."""
    from testkit import TINY, _cluster

    from kflow.molecular import ClusterStore, write_cluster_store
    from kflow.molecular.model.config import AssemblyModelConfig
    from kflow.molecular.workflow import train_assembly

    s = ClusterStore(write_cluster_store([_cluster(i, f"X{i % 10}") for i in range(40)], tmp_path / "toy.lmdb"))
    cfg = AssemblyModelConfig(**TINY)
    threads = torch.get_num_threads()
    runs = [train_assembly(s, tmp_path / f"run{i}", cfg, steps=4, batch_size=2, progress=False, checkpoint_every=2,
                           deterministic=True)[0] for i in range(2)]
    assert torch.get_num_threads() == threads  # restored after training
    half = tmp_path / "half"
    train_assembly(s, half, cfg, steps=4, batch_size=2, progress=False, checkpoint_every=2, deterministic=True)
    (half / "checkpoints" / "step_0000004.pt").unlink()
    (half / "checkpoints" / "last.pt").unlink()
    resumed, _, summary = train_assembly(s, half, cfg, steps=4, batch_size=2, progress=False, checkpoint_every=2,
                                         deterministic=True, resume=half / "checkpoints" / "step_0000002.pt")
    assert summary["resumed_from"] == 2 and summary["steps_run"] == 2
    for a, b, c in zip(*(m.state_dict().values() for m in (runs[0], runs[1], resumed))):
        assert torch.equal(a, b) and torch.equal(a, c)



def test_deterministic_mode_trains_on_one_thread_with_deterministic_algorithms(tmp_path):
    """What makes runs bit-identical on CPU (multi-threaded reductions add in a scheduling-dependent order): the
    settings are active inside every training step and restored afterwards."""
    from testkit import mse

    seen = []

    def spying_loss(model, batch):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return mse(model, batch)

    torch.set_num_threads(2)
    make_trainer(tmp_path, max_steps=3, loss_fn=spying_loss, deterministic=True).fit()
    assert seen == [(1, True)] * 3
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
