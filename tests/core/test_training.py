"""Trainer: learning, bit-for-bit resume, atomic checkpoints, clear errors, the non-finite guard."""
import json

import pytest
import torch
from torch import nn

from kflow.core.training import (CheckpointError, ConfigMismatchError, EpochBatchSampler, Trainer,
                                 cosine_with_warmup, load_checkpoint)

from testkit import make_trainer, mse


def test_loss_decreases_and_logs_are_written(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=60)
    summary = trainer.fit()
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.3 * records[0]["loss"]
    assert summary["step"] == 60 and summary["skipped_steps"] == 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lr", "grad_norm", "abs_err"} <= set(header)
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    kept = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in kept] == ["step_0000050.pt", "step_0000055.pt", "step_0000060.pt"]  # keep_checkpoints
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == kept[-1].read_bytes()


def test_resume_is_bit_for_bit(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=20)
    full.fit()
    calls = {"n": 0}

    def crashing(model, batch):  # the process dies during step 13 (last checkpoint: step 10)
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return mse(model, batch)

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "half", max_steps=20, loss_fn=crashing).fit()
    resumed = make_trainer(tmp_path / "half", max_steps=20)
    resumed.fit(resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for k in full.ema.shadow:
        assert torch.equal(full.ema.shadow[k], resumed.ema.shadow[k])
    lines = (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [json.loads(ln)["step"] for ln in
                                                        (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=5)
    trainer.fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    trainer.max_steps = 10
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupt_and_foreign_checkpoints_are_reported(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a kflow checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    trainer = make_trainer(tmp_path / "run", max_steps=2)
    trainer.fit()
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", nn.Sequential(nn.Linear(4, 8), nn.Tanh(),
                                                                                     nn.Linear(8, 1)))


def test_resume_with_other_config_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    other = make_trainer(tmp_path, max_steps=4, config={"width": 32})
    with pytest.raises(ConfigMismatchError, match="width"):
        other.fit(resume=True)
    # run-length keys may change
    make_trainer(tmp_path, max_steps=4, config={"width": 16, "max_steps": 4}).fit(resume=True)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    snapshots = {}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] in (3, 5):  # weights before the two bad steps and after them
            snapshots[calls["n"]] = [p.detach().clone() for p in model.parameters()]
        loss, m = mse(model, batch)
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), m

    trainer = make_trainer(tmp_path, max_steps=6, loss_fn=flaky, ema_decay=None)
    params = []
    orig_step = trainer.optimizer.step

    def spy():
        params.append(trainer.step)
        orig_step()

    trainer.optimizer.step = spy
    summary = trainer.fit()
    assert summary["skipped_steps"] == 2 and params == [0, 1, 4, 5]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[5]))
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    trainer2 = make_trainer(tmp_path / "b", max_steps=30, loss_fn=lambda m, b: (mse(m, b)[0] * float("inf"), {}),
                            max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="consecutive"):
        trainer2.fit()


def test_sampler_shards_global_batches_and_schedule_shape():
    one = EpochBatchSampler(20, 4, seed=1, rank=0, world_size=1)
    r0 = EpochBatchSampler(20, 2, seed=1, rank=0, world_size=2)
    r1 = EpochBatchSampler(20, 2, seed=1, rank=1, world_size=2)
    for g, a, b in zip(one.batches(3), r0.batches(3), r1.batches(3)):
        assert g == a + b
    assert one.batches(0) != one.batches(1)
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        EpochBatchSampler(3, 4)


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Trainer(nn.Linear(1, 1), mse, [], batch_size=1, lr=1e-3, max_steps=1, out_dir=tmp_path, device="cpu")


def test_resume_after_torn_log_line_and_checkpoint_records_data_position(tmp_path):
    make_trainer(tmp_path, max_steps=10).fit()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a crash after step 10 left a later record and a torn line
        f.write(json.dumps({"step": 12, "loss": 1.0}) + "\n" + '{"step": 13, "lo')
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # 64 items / batch 8 = 8 steps per epoch
    make_trainer(tmp_path, max_steps=14).fit(resume=True)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14]
    csv_steps = [int(ln.split(",")[0]) for ln in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == steps
