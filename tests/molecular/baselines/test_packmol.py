"""PackMol baseline: the real binary packs rigid, non-overlapping copies reproducibly; a missing binary and a failing
one give clear errors and leave no temporary files."""
import os
import tempfile

import numpy as np
import pytest
import torch

from kflow.molecular.baselines import packmol as pm

# Methanol (Å), atom order C, O, H(O), H, H, H.
METHANOL_Z = np.array([6, 8, 1, 1, 1, 1])
METHANOL = np.array([[-0.0467, 0.6631, 0.0000],
                     [-0.0467, -0.7561, 0.0000],
                     [-0.9803, -1.0780, 0.0000],
                     [-1.0837, 0.9826, 0.0000],
                     [0.4349, 1.0716, 0.8895],
                     [0.4349, 1.0716, -0.8895]])


def _have_packmol() -> bool:
    try:
        pm.find_packmol()
    except pm.PackmolNotFoundError:
        return False
    return True


needs_packmol = pytest.mark.skipif(not _have_packmol(), reason="PackMol binary not installed (pip install packmol)")


def _leftovers() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("kflow-packmol-")}


def _intermolecular_min(packed: np.ndarray) -> float:
    m, p, _ = packed.shape
    x = packed.reshape(-1, 3)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    mol = np.repeat(np.arange(m), p)
    d[mol[:, None] == mol[None]] = np.inf
    return float(d.min())


@needs_packmol
def test_pack_cluster_gives_rigid_non_overlapping_reproducible_copies():
    before = _leftovers()
    # A rotated, shifted pose of the molecule: any rigid pose is accepted.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    body = METHANOL @ q.T + np.array([5.0, -2.0, 1.0])
    out = pm.pack_cluster(METHANOL_Z, body, 17, density_g_cm3=0.8, tolerance=2.0, seed=7)
    assert out.shape == (17, 6, 3) and out.dtype == np.float64 and np.isfinite(out).all()
    ref = np.linalg.norm(body[:, None] - body[None], axis=-1)
    d = np.linalg.norm(out[:, :, None] - out[:, None, :], axis=-1)
    assert np.abs(d - ref).max() < 1e-3  # rigid copies, input atom order
    assert _intermolecular_min(out) > 2.0 - 0.05  # PackMol's tolerance, small slack
    radius = pm.sphere_radius(17 * 32.042 / pm.AVOGADRO / 0.8 * pm.A3_PER_CM3)
    assert np.linalg.norm(out, axis=-1).max() < radius + 0.15  # inside the sphere, to PackMol's penalty precision
    again = pm.pack_cluster(METHANOL_Z, body, 17, density_g_cm3=0.8, tolerance=2.0, seed=7)
    np.testing.assert_array_equal(out, again)
    other = pm.pack_cluster(METHANOL_Z, body, 17, volume_A3=4 / 3 * np.pi * radius**3, tolerance=2.0, seed=8)
    assert not np.allclose(out, other)
    assert _leftovers() == before


@needs_packmol
def test_packmol_predictions_follow_cluster_atom_order():
    from kflow.molecular.data.cluster import Cluster

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(17, 3))
    final = (METHANOL[None] + centres[:, None]).reshape(-1, 3)
    # Molecules interleaved (atoms of a molecule need not be contiguous), atom order within each molecule kept.
    mol = rng.permutation(np.repeat(np.arange(17), 6))
    rank = np.array([(mol[:a] == mol[a]).sum() for a in range(mol.size)])
    order = mol * 6 + rank
    z = np.tile(METHANOL_Z, 17)[order]
    cluster = Cluster(z, mol, final[order] + 1.0, final[order], name="toy")
    dataset = type("DS", (), {"__len__": lambda self: 1, "cluster": lambda self, i: cluster})()
    preds = pm.packmol_predictions(dataset, seed=1)
    assert len(preds) == 1 and preds[0].shape == (1, 17 * 6, 3)
    pred = preds[0][0].double().numpy()
    torch.testing.assert_close(torch.from_numpy(pred.mean(0)), torch.from_numpy(final.mean(0)), atol=1e-4, rtol=0)
    for k in range(17):
        atoms = pred[mol == k]
        assert np.abs(np.linalg.norm(atoms[:, None] - atoms[None], axis=-1)
                      - np.linalg.norm(METHANOL[:, None] - METHANOL[None], axis=-1)).max() < 1e-3
    centroids = np.stack([pred[mol == k].mean(0) for k in range(17)])
    assert np.linalg.norm(centroids - pred.mean(0), axis=1).argmin() == 0  # the central copy is molecule 0
    np.testing.assert_array_equal(pred, pm.packmol_predictions(dataset, seed=1)[0][0].double().numpy())


def test_missing_binary_raises_with_install_hint(monkeypatch):
    with pytest.raises(pm.PackmolNotFoundError, match="pip install packmol"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=0.8, binary="/nonexistent")
    monkeypatch.delenv("KFLOW_PACKMOL", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(pm, "_wheel_binary", lambda: None)
    with pytest.raises(pm.PackmolNotFoundError, match="pip install packmol") as err:
        pm.find_packmol()
    assert isinstance(err.value, FileNotFoundError)
    monkeypatch.setenv("KFLOW_PACKMOL", "/nonexistent/packmol")
    with pytest.raises(pm.PackmolNotFoundError, match="KFLOW_PACKMOL"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=0.8)


def test_failing_binary_raises_with_output_tail_and_leaves_no_files(tmp_path, monkeypatch):
    fake = tmp_path / "fake-packmol"
    fake.write_text("#!/bin/sh\necho 'reading input'\necho 'ERROR: something broke in the packer' >&2\nexit 1\n")
    fake.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(pm.PackmolError, match="status 1") as err:
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=0.8, binary=fake)
    assert "something broke in the packer" in str(err.value)
    assert list(scratch.iterdir()) == []

    silent = tmp_path / "silent-packmol"  # exits 0 without writing the output file
    silent.write_text("#!/bin/sh\necho 'nothing done'\n")
    silent.chmod(0o755)
    with pytest.raises(pm.PackmolError, match="without writing its output") as err:
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=0.8, binary=silent)
    assert "nothing done" in str(err.value)

    slow = tmp_path / "slow-packmol"
    slow.write_text("#!/bin/sh\necho 'started'\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(pm.PackmolError, match="timed out"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=0.8, binary=slow, timeout_s=0.5)
    assert list(scratch.iterdir()) == []


def test_region_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, binary="/nonexistent")
    with pytest.raises(ValueError, match="exactly one"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, density_g_cm3=1.0, volume_A3=1000.0, binary="/nonexistent")
    with pytest.raises(ValueError, match="not even one copy"):
        pm.pack_cluster(METHANOL_Z, METHANOL, 17, volume_A3=1.0, binary="/nonexistent")
