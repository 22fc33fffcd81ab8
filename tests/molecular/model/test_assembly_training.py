"""Assembly training end to end on synthetic clusters: learning beats identity, resume, clear errors."""
import pytest
import torch

from kflow.core.training import CheckpointError, ConfigMismatchError
from kflow.molecular import ClusterDataset, write_cluster_store
from kflow.molecular.model.config import AssemblyModelConfig
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.workflow import (evaluate_assembly, load_assembly_model, predict_assembly, train_assembly)

from testkit import TINY, _cluster


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    clusters = [_cluster(i, f"X{i % 10}") for i in range(40)]
    return write_cluster_store(clusters, tmp_path_factory.mktemp("s") / "toy.lmdb")


def test_short_training_beats_identity(tmp_path, store):
    from kflow.molecular import ClusterStore

    from kflow.molecular.model.flow import collate_clusters
    from kflow.molecular.model.config import build_assembly_model

    s = ClusterStore(store)
    config = AssemblyModelConfig(num_bands=2, **TINY)
    train = ClusterDataset(s, split="train")
    batch = collate_clusters([train[i] for i in range(8)])
    t = torch.linspace(0.05, 0.95, 8)
    torch.manual_seed(0)
    untrained, rigid0 = build_assembly_model(config)
    before = AssemblyLoss(rigid0)(untrained, batch, t)[0].item()
    model, rigid, summary = train_assembly(s, tmp_path, config, steps=120, batch_size=4, lr=5e-3, progress=False,
                                           ema_decay=0.9)
    with torch.no_grad():
        after = AssemblyLoss(rigid)(model, batch, t)[0].item()
    assert after < 0.7 * before, (before, after)
    preds = predict_assembly(model, rigid, train, steps=8)
    learned, identity = evaluate_assembly(train, preds), evaluate_assembly(train)
    assert learned["pm_atom"]["mean"] < identity["pm_atom"]["mean"]
    assert learned["pm_center"]["mean"] < identity["pm_center"]["mean"]


def test_assembly_resume_is_exact_and_config_changes_are_refused(tmp_path, store, monkeypatch):
    from kflow.molecular import ClusterStore

    s = ClusterStore(store)
    cfg = AssemblyModelConfig(num_bands=2, **TINY)
    full, _, _ = train_assembly(s, tmp_path / "full", cfg, steps=4, batch_size=2, progress=False,
                                checkpoint_every=2)
    calls = {"n": 0}
    original = AssemblyLoss.__call__

    def crash(self, model, batch, t=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, model, batch, t)

    monkeypatch.setattr(AssemblyLoss, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        train_assembly(s, tmp_path / "part", cfg, steps=4, batch_size=2, progress=False, checkpoint_every=2)
    monkeypatch.setattr(AssemblyLoss, "__call__", original)
    resumed, _, _ = train_assembly(s, tmp_path / "part", cfg, steps=4, batch_size=2, progress=False,
                                   checkpoint_every=2, resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigMismatchError, match="model"):
        train_assembly(s, tmp_path / "part", AssemblyModelConfig(num_bands=3, **TINY), steps=6, batch_size=2,
                       progress=False, resume=True)
    model, rigid, config = load_assembly_model(tmp_path / "full" / "checkpoints" / "last.pt")
    assert rigid.num_bands == 2 and config["model"]["hidden_irreps"] == TINY["hidden_irreps"]
    (tmp_path / "broken.pt").write_bytes((tmp_path / "full" / "checkpoints" / "last.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_assembly_model(tmp_path / "broken.pt")


def test_bad_inputs_are_clear(tmp_path, store):
    from kflow.molecular import ClusterStore
    from kflow.molecular.model.flow import collate_clusters
    from kflow.molecular.model.config import build_assembly_model

    s = ClusterStore(store)
    model, rigid = build_assembly_model(AssemblyModelConfig(**TINY))
    weird = _cluster(0, "W")
    weird.atomic_numbers[3] = 105  # beyond the element table of the network
    batch = collate_clusters([weird])
    with pytest.raises(ValueError, match="atomic numbers"):
        AssemblyLoss(rigid)(model, batch)
    empty = ClusterDataset(s, split="test")
    empty.indices_ = []
    with pytest.raises(ValueError, match="empty"):
        evaluate_assembly(empty)
