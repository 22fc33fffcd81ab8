"""The generative recipe for starts from the molecule alone: starts redrawn every epoch, a central molecule with
one role in the start, the coupling and the network, a pose loss that behaves at large angles, and training
times concentrated where the path is decided."""
import math

import pytest
import torch

from kflow.core import BandSchedule
from kflow.molecular.data.cluster import Cluster
from kflow.molecular.data.starts import NOISE_PRESETS
from kflow.molecular.data.datasets import redraw_start
from kflow.molecular.model.flow import RigidKFlow, collate_clusters
from kflow.molecular.model.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.model.objective import AssemblyLoss, pose_errors, sample_training_times
from kflow.molecular.so3 import exp_map, random_rotations

from testkit import ToyView

F64 = torch.float64


def _crystal_cluster(seed=0, m=17, p=6):
    """A Cluster whose final positions are a lattice-like arrangement of one rigid molecule (molecule 0 central)."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(p, 3, generator=g, dtype=F64) * 1.1
    body -= body.mean(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:m] * 5.0  # centre first
    rot = random_rotations(m, dtype=F64, generator=g)
    final = (torch.einsum("mij,pj->mpi", rot, body) + sites[:, None]).reshape(-1, 3)
    z = torch.tensor([6, 6, 8, 7, 1, 1][:p]).repeat(m)
    cluster = Cluster(z, torch.arange(m).repeat_interleave(p), final, final, "toy_draw0", "toy")
    cluster.info.update(noise={**NOISE_PRESETS["hard"].__dict__}, volume_per_molecule=125.0)
    return cluster


def test_hard_preset_has_a_central_molecule():
    assert NOISE_PRESETS["hard"].central and NOISE_PRESETS["hard"].placement == "random"
    final = _crystal_cluster().final_positions.double().reshape(17, -1, 3)
    start = NOISE_PRESETS["hard"].apply(final, torch.Generator().manual_seed(3), 125.0)  # [M, P, 3]
    centroids = start.mean(1)
    assert torch.allclose(centroids[0], final.mean(1).mean(0), atol=1e-9)  # exactly at the centre
    assert (centroids[1:] - centroids[0]).norm(dim=-1).min() > 0  # the others around it


def test_redrawn_start_is_the_noise_model_applied_to_the_crystal_and_reproducible():
    cluster = _crystal_cluster()
    a, b, c = redraw_start(cluster, "hard", 11), redraw_start(cluster, "hard", 11), redraw_start(cluster, "hard", 12)
    assert torch.equal(a.initial_positions, b.initial_positions)
    assert not torch.allclose(a.initial_positions, c.initial_positions)
    final = cluster.final_positions.double().reshape(17, -1, 3)
    expected = NOISE_PRESETS["hard"].apply(final, torch.Generator().manual_seed(11), 125.0).reshape(-1, 3)
    shift = expected.mean(0)
    assert torch.allclose(a.initial_positions.double(), expected - shift, atol=1e-5)
    # The crystal is unchanged up to the same shift, and the start is centred like build_cluster's.
    assert torch.allclose(a.final_positions.double(), cluster.final_positions.double() - shift, atol=1e-5)
    assert a.initial_positions.double().mean(0).abs().max() < 1e-5
    assert a.info["start_seed"] == 11


def test_redrawn_starts_change_with_the_epoch_and_repeat_for_the_same_epoch():
    from kflow.molecular.data.datasets import RedrawnStarts

    View = lambda: ToyView(_crystal_cluster, [4, 9])  # noqa: E731
    data = RedrawnStarts(View(), seed=3)
    first = data.cluster(1).initial_positions
    data.set_epoch(1)
    second = data.cluster(1).initial_positions
    data.set_epoch(0)
    assert torch.equal(data.cluster(1).initial_positions, first) and not torch.allclose(first, second)
    assert data.start_seed(0) != data.start_seed(1)  # items differ within an epoch
    assert RedrawnStarts(View(), seed=4).start_seed(1) != data.start_seed(1)  # and across training seeds


def test_trainer_tells_the_data_set_its_epoch(tmp_path):
    from kflow.core.training import Trainer

    class EpochData(torch.utils.data.Dataset):
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(i)])

    data = EpochData()
    model = torch.nn.Linear(1, 1)
    trainer = Trainer(model, lambda m, x: (m(x).square().mean(), {}), data, collate_fn=torch.stack, batch_size=4,
                      lr=1e-3, max_steps=6, out_dir=tmp_path, checkpoint_every=100, progress=False, device="cpu")
    trainer.fit()
    assert data.epochs[:3] == [0, 1, 2]  # 2 steps per epoch, 6 steps


def test_eot_with_a_central_molecule_pairs_it_with_the_crystals_and_pivots_on_it():
    cluster = _crystal_cluster(1)
    start = redraw_start(cluster, "hard", 5)
    batch = collate_clusters([start], dtype=F64, coupling="eot", central=True)
    # Molecule 0 stays molecule 0 and its coupled final centroid coincides with its start centroid (the pivot).
    final0 = batch.final_translations[0, 0]
    assert torch.allclose(final0, batch.initial_translations[0, 0], atol=1e-6)
    free = collate_clusters([start], dtype=F64, coupling="eot", central=False)
    assert not torch.allclose(free.final_translations[0, 0], free.initial_translations[0, 0], atol=1e-3)


def _network(central_feature):
    torch.manual_seed(0)
    net = AssemblyNetwork("8x0e + 4x1o + 4x1e", num_molecule_layers=1, schedule=BandSchedule(1),
                          central_feature=central_feature).double()
    for p in net.head.parameters():
        torch.nn.init.normal_(p)
    if central_feature:
        torch.nn.init.normal_(net.central_atoms)
        torch.nn.init.normal_(net.central_molecule)
    return AssemblyFlowModel(net, condition_on_start=False)


@pytest.mark.parametrize("central_feature", [False, True])
def test_central_feature_marks_molecule_zero_and_keeps_equivariance(central_feature):
    model = _network(central_feature)
    start = redraw_start(_crystal_cluster(2), "hard", 7)
    batch = collate_clusters([start], dtype=F64, coupling="eot", central=True)
    t = torch.tensor([0.4], dtype=F64)
    z = RigidKFlow(1).for_batch(batch).interpolate(batch.initial_chart(), batch.final_chart(), t)
    out = batch.positions_from_chart(model(z, t, batch=batch))  # [1, M, P, 3]
    # Rotating everything rotates the prediction.
    q = random_rotations(1, dtype=F64, generator=torch.Generator().manual_seed(1))[0]
    moved = Cluster(start.atomic_numbers, start.molecule_index, start.initial_positions.double() @ q.T,
                    start.final_positions.double() @ q.T, start.name)
    mb = collate_clusters([moved], dtype=F64, coupling="eot", central=True)
    zm = RigidKFlow(1).for_batch(mb).interpolate(mb.initial_chart(), mb.final_chart(), t)
    out_m = mb.positions_from_chart(model(zm, t, batch=mb))
    assert (out @ q.T - out_m).abs().max() < 1e-6
    # Swapping the central molecule with molecule 5 in the start: a network without the feature just swaps its
    # predictions; with the feature molecule 0 has another role, so the prediction changes.
    m = 17
    order = torch.arange(m)
    order[0], order[5] = 5, 0
    with torch.no_grad():
        cur = batch.positions_from_chart(z)[0]  # current atoms [M, P, 3]
        items = [{"atomic_numbers": start.atomic_numbers, "molecule_index": start.molecule_index,
                  "initial_positions": c.reshape(-1, 3), "final_positions": c.reshape(-1, 3)} for c in
                 (cur, cur[order])]
        a, b = collate_clusters(items[:1], dtype=F64), collate_clusters(items[1:], dtype=F64)
        pa = a.positions_from_chart(model(a.initial_chart(), t, batch=a))[0]
        pb = b.positions_from_chart(model(b.initial_chart(), t, batch=b))[0]
    same = (pa[order] - pb).abs().max() < 1e-6
    assert bool(same) == (not central_feature)


def _pose_batch():
    return collate_clusters([redraw_start(_crystal_cluster(3), "hard", 2)], dtype=F64, coupling="eot", central=True)


def test_pose_error_is_the_mean_squared_atom_displacement():
    batch = _pose_batch()
    g = torch.Generator().manual_seed(0)
    z_hat = batch.final_chart() + torch.randn(batch.final_chart().shape, generator=g, dtype=F64)
    translation, rotation = pose_errors(z_hat, batch)
    atoms_hat, atoms = batch.positions_from_chart(z_hat), batch.final_positions()  # [B, M, P, 3]
    msd = ((atoms_hat - atoms).square().sum(-1) * batch.mask).sum(-1) / batch.mask.sum(-1)  # [B, M]
    assert torch.allclose(translation + rotation, msd, atol=1e-9)


def test_atom_pose_loss_is_continuous_where_the_chart_loss_jumps():
    # The same rotation written on either side of the log map's cut (θ = π ∓ ε): the chart error between the two
    # is ~(2πℓ)², the atom pose error ~0.
    batch = _pose_batch()
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -1.0, 0.4], dtype=F64), dim=0)
    scale = batch.rotation_scale[0]
    target = exp_map(axis * (math.pi - 1e-3))
    b = batch
    b.final_rotations = target.expand_as(b.final_rotations).clone()
    z1 = b.final_chart()
    z_hat = z1.clone()
    z_hat[..., 3:] = -axis * (math.pi - 1e-3) * scale  # the same rotation up to 2e-3 rad, other branch
    chart_error = (z_hat - z1).square().sum(-1).mean()
    _, rotation = pose_errors(z_hat, b)
    assert chart_error > (2 * math.pi - 0.1) ** 2 * scale ** 2 * 0.9
    assert rotation.max() < 1e-4 * scale ** 2


def test_band_start_time_sampling_puts_mass_at_the_start_of_each_window():
    torch.manual_seed(0)
    for k in (1, 2):
        schedule = BandSchedule(k)
        t = sample_training_times(20000, schedule, "band_start", dtype=F64)
        u = sample_training_times(20000, schedule, "uniform", dtype=F64)
        assert t.min() >= 0 and t.max() <= 1
        starts = schedule.starts.double()
        after = lambda x: (((x[:, None] - starts[None]) >= 0)  # noqa: E731
                                     & ((x[:, None] - starts[None]) < 0.05)).any(1).float().mean()
        assert after(t) > 1.5 * after(u)  # uniform: 0.05 per band; band_start: ~0.14 (K=1), ~0.21 (K=2)
    with pytest.raises(ValueError, match="time_sampling"):
        sample_training_times(4, BandSchedule(1), "late")


def test_assembly_loss_options_train_the_same_model_interface():
    batch = _pose_batch()
    model = _network(True)
    for rotation_loss in ("chart", "atoms"):
        loss, metrics = AssemblyLoss(RigidKFlow(1), rotation_loss, 0.5, "band_start")(model, batch)
        assert torch.isfinite(loss) and loss.requires_grad and metrics
    with pytest.raises(ValueError, match="rotation_loss"):
        AssemblyLoss(RigidKFlow(1), "quaternion")


def test_config_rejects_unknown_recipe_options_and_old_configs_load_with_defaults():
    from kflow.molecular.model.config import AssemblyModelConfig

    with pytest.raises(ValueError, match="time_sampling"):
        AssemblyModelConfig(time_sampling="late")
    old = AssemblyModelConfig().to_dict()
    for key in ("central", "rotation_loss", "rotation_weight", "time_sampling", "redraw_starts"):
        del old[key]
    cfg = AssemblyModelConfig.from_dict(old)
    assert (cfg.central, cfg.rotation_loss, cfg.time_sampling, cfg.redraw_starts) == (False, "chart", "uniform",
                                                                                       False)


def test_shell_preset_is_the_even_shell_in_a_random_frame():
    from dataclasses import replace

    final = _crystal_cluster().final_positions.double().reshape(17, -1, 3)
    exact = replace(NOISE_PRESETS["shell"], jitter=0.0)
    a = exact.apply(final, torch.Generator().manual_seed(1), 125.0).mean(1)  # [M, 3] start centroids
    b = exact.apply(final, torch.Generator().manual_seed(2), 125.0).mean(1)
    centre = final.mean(1).mean(0)
    radius = 0.75 * (3 * 17 * 125.0 / (4 * math.pi)) ** (1 / 3)
    assert torch.allclose(a[0], centre, atol=1e-9)
    assert torch.allclose((a[1:] - centre).norm(dim=-1), torch.full((16,), radius, dtype=F64), atol=1e-9)
    # Same shape (sorted distance matrices), another orientation and numbering for another seed.
    da, db = torch.cdist(a, a).flatten().sort().values, torch.cdist(b, b).flatten().sort().values
    assert torch.allclose(da, db, atol=1e-9) and not torch.allclose(a, b, atol=1e-3)
    jittered = NOISE_PRESETS["shell"].apply(final, torch.Generator().manual_seed(1), 125.0).mean(1)
    offsets = (jittered[1:] - centre).norm(dim=-1) - radius
    assert 0.05 < offsets.abs().mean() < 1.5  # jitter of 0.5 Å


def test_medoid_sample_is_the_consensus_of_the_samples():
    from kflow.molecular.model.sampling import medoid_sample

    cluster = _crystal_cluster(4)
    truth = cluster.final_positions.double()
    g = torch.Generator().manual_seed(0)
    near = [truth + 0.1 * torch.randn(truth.shape, generator=g, dtype=F64) for _ in range(3)]
    far = [redraw_start(cluster, "hard", s).initial_positions.double() for s in (1, 2)]
    samples = [far[0], near[0], far[1], near[1], near[2]]
    pick = medoid_sample(samples, cluster.molecule_index)
    assert pick in (1, 3, 4)  # one of the three that agree, not an outlier
    assert medoid_sample(samples[:1], cluster.molecule_index) == 0
    # Relabelling molecules or moving a sample rigidly does not change the choice (matched PM-center).
    q = random_rotations(1, dtype=F64, generator=g)[0]
    moved = [x @ q.T + 3.0 for x in samples]
    assert medoid_sample(moved, cluster.molecule_index) == pick


def test_a_run_recorded_before_the_recipe_fields_resumes_as_the_same_configuration():
    from kflow.molecular.model.config import RECIPE_FIELDS, AssemblyModelConfig

    old_record = {k: v for k, v in AssemblyModelConfig().to_dict().items() if k not in RECIPE_FIELDS}
    assert AssemblyModelConfig().run_record() == old_record  # defaults: recorded as before
    generative = AssemblyModelConfig(central=True, rotation_loss="atoms", redraw_starts=True)
    assert generative.run_record() != old_record  # a real change is still a change
    assert AssemblyModelConfig.from_dict(generative.run_record()) == generative


def test_resume_compares_recorded_configurations_in_canonical_form():
    from kflow.molecular.model.config import AssemblyModelConfig
    from kflow.molecular.workflow import _canonical_run_config

    config = AssemblyModelConfig(num_bands=3, central=True, rotation_loss="atoms")
    full, short = {"model": config.to_dict(), "lr": 1e-3}, {"model": config.run_record(), "lr": 1e-3}
    assert full != short and _canonical_run_config(full) == _canonical_run_config(short)
    other = {"model": AssemblyModelConfig(num_bands=3, central=True).run_record(), "lr": 1e-3}
    assert _canonical_run_config(other) != _canonical_run_config(full)
