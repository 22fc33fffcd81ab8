"""End to end through the scripts' main(argv): train a tiny DiT on digit latents, resume, sample, steering grids."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # the shared fixture of conftest.py, for every test of this file
    yield


def test_train_resume_and_sample_through_the_scripts(tmp_path):
    import sample_image
    import train_image

    from kflow.core import load_checkpoint

    run = tmp_path / "run"
    args = ["--dataset", "digits", "--model", "DiT-M/1", "--decomposition", "pca", "--num-bands", "2",
            "--steps", "4", "--batch-size", "16", "--ae-steps", "10", "--ae-width", "8", "--checkpoint-every", "2",
            "--out", str(run), "--no-progress"]
    train_image.main(args)
    for name in ("checkpoints/last.pt", "latents.lmdb/data.mdb", "autoencoder.pt", "pca.pt", "image_config.json"):
        assert (run / name).exists(), name
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    basis = (run / "pca.pt").read_bytes()
    latents_mtime = (run / "latents.lmdb" / "data.mdb").stat().st_mtime_ns

    train_image.main([a if a != "4" else "6" for a in args] + ["--resume"])
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # resumed, not restarted
    assert (run / "pca.pt").read_bytes() == basis  # the fitted basis is reused, not refitted
    assert (run / "latents.lmdb" / "data.mdb").stat().st_mtime_ns == latents_mtime  # latents encoded once

    sample_image.main(["--run", str(run), "--num", "6", "--steps", "3", "--cfg-scale", "1.5", "--condition-tau",
                       "0.3", "--out", str(tmp_path / "s"), "--steering-figures"])
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (6, 1, 8, 8) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    for name in ("s.png", "s_share_low_bands.png", "s_share_high_bands.png", "s_condition_kept_vs_dropped.png"):
        assert (tmp_path / name).stat().st_size > 100, name

    sample_image.main(["--run", str(run), "--num", "4", "--method", "euler", "--steps-per-band", "2", "1",
                       "--out", str(tmp_path / "per_band")])
    assert np.load(tmp_path / "per_band.npz")["images"].shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="steps_per_band"):
        sample_image.main(["--run", str(run), "--num", "2", "--steps-per-band", "2", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.npz").exists()

    import analyze_image

    analyze_image.main(["--runs", str(run), "--out", str(tmp_path / "analysis"), "--num-bands", "2",
                        "--trajectories", "4", "--steps", "4"])
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    for name in ("Fourier", "Wavelet", "PCA"):
        assert sum(result["band_energy"][name]["energy_share"]) == pytest.approx(1.0)
    curve = next(iter(result["pca_projection_ratio"].values()))
    assert len(curve) == len(result["times"]) and all(0 <= v <= 1 for v in curve)
    for name in ("fig3_band_energy.png", "fig4_pca_projection.png"):
        assert (tmp_path / "analysis" / name).stat().st_size > 1000, name


def test_scripts_reject_bad_runs_and_options(tmp_path):
    import sample_image
    import train_image

    with pytest.raises(FileNotFoundError, match="image_config.json"):
        sample_image.main(["--run", str(tmp_path)])
    with pytest.raises(SystemExit):
        train_image.main(["--decomposition", "bogus"])
    with pytest.raises(SystemExit):
        train_image.main(["--min-lr-ratio", "1.5"])
    with pytest.raises(ValueError, match="one-band baseline"):
        train_image.main(["--dataset", "digits", "--decomposition", "none", "--num-bands", "2", "--steps", "1",
                          "--ae-steps", "2", "--ae-width", "8", "--out", str(tmp_path / "r"), "--no-progress"])
