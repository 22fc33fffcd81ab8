"""The image study's tooling (issue 13): --data-root on every image script, the missing-data message, distinct
sample files, the per-class FID warning, resumable study cells and the study's code path on a miniature budget
(a tiny feature network stands in for Inception-v3)."""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # the shared fixture of conftest.py, for every test of this file
    yield


class TinyFeatures(torch.nn.Module):
    """16 features from a fixed random convolution: a fast stand-in for Inception-v3 (FID needs no meaning here)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 2).flatten(1)


@pytest.fixture
def tiny_features(monkeypatch):
    from kflow.vision.metrics import InceptionFeatures
    from kflow.vision.study import context

    monkeypatch.setattr(context, "feature_network", lambda path: InceptionFeatures(TinyFeatures(), resize=16))


def image_folder(root: Path, per_class: int = 16, classes: int = 2) -> Path:
    """32×32 grey PNGs in one folder per class (class c: a bright square in a class-dependent corner)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(32, 32)).astype(np.uint8)
            img[4 + 12 * c:16 + 12 * c, 4:16] = 220
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------------- data
def test_every_image_script_takes_data_root():
    import analyze_image
    import evaluate_image
    import sample_image
    import train_image

    for script in (train_image, sample_image, evaluate_image, analyze_image):
        with pytest.raises(SystemExit) as exit_:
            script.main(["--help"])
        assert exit_.value.code == 0
    # parse only: each parser accepts the same flag (the functions are not reached with a bad run folder)
    for script, argv in ((sample_image, ["--run", "/nonexistent"]), (analyze_image, ["--runs", "/x", "--out", "/y"]),
                         (evaluate_image, ["--samples", "/nonexistent.npz"])):
        with pytest.raises((FileNotFoundError, ValueError)):
            script.main(argv + ["--data-root", "/somewhere"])


def test_missing_fashion_mnist_says_what_to_run(tmp_path, capsys, monkeypatch):
    import evaluate_image
    import train_image

    from kflow.utils.cli import run_main

    monkeypatch.delenv("KFLOW_FASHION_MNIST", raising=False)
    # evaluate_image checks its samples file before anything else (a bad one is refused first), so give it a real one
    from kflow.vision.artifacts import write_samples
    write_samples(tmp_path / "s.npz", torch.rand(2, 1, 8, 8), None)
    for script, argv in ((train_image, ["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1",
                                        "--no-progress"]),
                         (evaluate_image, ["--samples", str(tmp_path / "s.npz"), "--data-root", str(tmp_path)])):
        monkeypatch.setattr(sys, "argv", ["x", *argv])
        with pytest.raises(SystemExit) as exit_:
            run_main(lambda: script.main(argv))
        message = str(exit_.value.code)
        assert message.startswith("error: Fashion-MNIST not found") and "\n" not in message
        assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
        assert "KFLOW_FASHION_MNIST" in message and "root=" not in message
    monkeypatch.setenv("KFLOW_FASHION_MNIST", str(tmp_path / "env"))
    from kflow.vision.data import DataNotFoundError, load_fashion_mnist

    with pytest.raises(DataNotFoundError, match="env"):
        load_fashion_mnist("test")


# ----------------------------------------------------------------------------------------------- outputs
def test_sampling_variants_write_distinct_files_and_never_overwrite(tmp_path):
    import sample_image
    import train_image

    run = tmp_path / "run"
    train_image.main(["--dataset", "digits", "--model", "DiT-M/1", "--decomposition", "fourier", "--num-bands", "2",
                      "--steps", "2", "--batch-size", "8", "--ae-steps", "2", "--ae-width", "8", "--out", str(run),
                      "--no-progress"])
    common = ["--run", str(run), "--num", "4", "--steps", "2"]
    sample_image.main(common)
    sample_image.main(common + ["--condition-tau", "0.3"])
    sample_image.main(common + ["--method", "euler"])
    names = sorted(p.name for p in run.glob("samples_*.npz"))
    assert names == ["samples_euler2_n4.npz", "samples_heun2_n4.npz", "samples_heun2_n4_tau0.3.npz"]
    before = (run / "samples_heun2_n4.npz").read_bytes()
    with pytest.raises(ValueError, match="exists.*--out.*--overwrite"):
        sample_image.main(common + ["--seed", "0"])
    assert (run / "samples_heun2_n4.npz").read_bytes() == before
    sample_image.main(common + ["--overwrite", "--seed", "0"])
    sample_image.main(common + ["--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine.npz").exists() and (tmp_path / "mine.png").exists()


def test_shared_latent_folder_refuses_other_settings(tmp_path):
    import train_image

    args = ["--dataset", "digits", "--model", "DiT-M/1", "--steps", "1", "--batch-size", "8", "--ae-width", "8",
            "--latent-dir", str(tmp_path / "latents"), "--no-progress"]
    train_image.main(args + ["--ae-steps", "2", "--out", str(tmp_path / "a"), "--decomposition", "none",
                             "--num-bands", "1"])
    record = json.loads((tmp_path / "latents" / "latents.json").read_text())
    train_image.main(args + ["--ae-steps", "2", "--out", str(tmp_path / "b")])  # same latents: fine
    assert json.loads((tmp_path / "latents" / "latents.json").read_text()) == record
    with pytest.raises(ValueError, match="ae_steps 2 there vs 3 now"):
        train_image.main(args + ["--ae-steps", "3", "--out", str(tmp_path / "c")])


def test_per_class_fid_warns_below_the_threshold_and_reports_counts():
    from kflow.vision.metrics import MIN_CLASS_SAMPLES, SmallSampleWarning, condition_dropping_scores

    gen = torch.Generator().manual_seed(0)

    def feats(n):
        return torch.randn(n, 4, generator=gen, dtype=torch.float64)

    labels = torch.arange(40) % 2
    with pytest.warns(SmallSampleWarning, match=f"fewer than {MIN_CLASS_SAMPLES} samples"):
        scores = condition_dropping_scores(feats(40), labels, feats(40), labels, feats(40), labels)
    assert scores["min_class_samples"] == 20 and set(scores["class_fid_full"]) == {0, 1}
    big = torch.arange(2 * MIN_CLASS_SAMPLES) % 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)
        n = 4 * MIN_CLASS_SAMPLES
        condition_dropping_scores(feats(n), torch.arange(n) % 2, feats(len(big)), big, feats(len(big)), big)


# ----------------------------------------------------------------------------------------------- the study
MINI = ["train_images=24", "batch_size=8", "val_images=8", "ae_steps=2", "ae_width=8", "steps=4", "ablation_steps=4",
        "eval_every=2", "val_samples=8", "ref_samples=16", "sweep_samples=8", "nfe=4,20", "cdr_per_class=4",
        "correlation_pairs=2", "figure_pairs=2"]


def test_two_runners_extract_shared_features_once(tmp_path, monkeypatch):
    """A runner that finds another one extracting the same reference features waits for that file instead of
    extracting them again; the first extraction saves them for every later call."""
    import threading
    from types import SimpleNamespace

    from kflow.utils.io import FolderLock, atomic_save
    from kflow.vision.study import context as study

    monkeypatch.setattr(study, "FEATURE_WAIT_S", 0.02)
    extracted = []
    monkeypatch.setattr(study, "extract_features", lambda net, images, progress=False: extracted.append(1) or images)
    ctx, path = SimpleNamespace(net=None), tmp_path / "features_test.pt"

    def must_not_run():
        raise AssertionError("the waiting runner extracted the features itself")

    other = FolderLock(tmp_path, path.name + ".lock", what="feature extraction").acquire()  # the other runner

    def other_finishes():
        atomic_save(torch.ones(3, 2), path)
        other.release()

    timer = threading.Timer(0.2, other_finishes)
    timer.start()
    try:
        got = study.StudyContext.features(ctx, path, must_not_run)
    finally:
        timer.join()
    assert torch.equal(got, torch.ones(3, 2)) and not extracted

    fresh = tmp_path / "features_val.pt"
    first = study.StudyContext.features(ctx, fresh, lambda: torch.zeros(4, 2))
    again = study.StudyContext.features(ctx, fresh, must_not_run)
    assert extracted == [1] and torch.equal(first, again) and not (tmp_path / "features_val.pt.lock").exists()


def test_study_quick_code_path_and_resumable_cells(tmp_path, tiny_features, capsys):
    from benchmarks import bench_vision
    from benchmarks.vision_study import KFLOW_ROWS, QUICK, Plan, _override

    data = image_folder(tmp_path / "images")
    out = tmp_path / "study"
    argv = ["--study", "--quick", "--jobs", "1", "--out", str(out), "--set", f"dataset={data}", *MINI]
    bench_vision.main(argv)
    text = capsys.readouterr().out
    for heading in ("Comparison at the study budget", "Sampling budget", "Schedule ablation", "Steerability", "Verdict"):
        assert heading in text, heading
    results = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json") if "work" not in p.parts)
    model_cells = [r for r in results if r.startswith("model/")]
    # FM ×2, three K-Flow rows, the best K-Flow's second seed, three ablations; three steering cells
    assert len(model_cells) == 9 and len([r for r in results if r.startswith("steering/")]) == 3
    budget = _override(QUICK, [f"dataset={data}", *MINI])
    plan = Plan(out, out / "work", budget, out / "figures")
    best = plan.best_kflow()
    assert best in KFLOW_ROWS
    fm = plan.model_cell("flow matching", 0).load()
    assert fm["steps_run"] == 4 and fm["best_step"] in (2, 4)
    assert set(fm["sweep"]) == {"euler@4", "heun@4", "euler@20", "heun@20"}
    kflow = plan.model_cell(best, 0).load()
    assert set(kflow["sweep"]) == {f"{m}@{n}" for m in ("euler", "heun", "band") for n in (4, 20)}
    assert kflow["latents"] == fm["latents"]
    ablation = json.loads(next((out / "model").glob("*high_low_s0.json")).read_text())
    assert set(ablation["sweep"]) == {"heun@20", "band@20"} and ablation["config"]["order"] == "high_to_low"
    assert kflow["config"]["wavelet"] in (None, "db6")
    assert (out / "figures" / "vision_study_curves.png").stat().st_size > 1000
    assert list((out / "figures").glob("vision_study_flow_matching_share_low_bands.png"))
    steering = json.loads(next((out / "steering").glob("flow_matching_s0.json")).read_text())
    assert set(steering["band_correlation"]) == {"share_low", "share_high", "independent"}
    assert set(steering["cdr"]) == {"0.3", "0.6"}

    # a rerun recomputes nothing: every cell is loaded from its JSON
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if "work" not in p.parts}
    bench_vision.main(argv)
    assert "training up to" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a cell whose JSON is gone is redone from its saved training (no retraining, cached features)
    cell = plan.model_cell("flow matching", 1)
    saved = cell.load()
    cell.result_path.unlink()
    bench_vision.main(argv)
    assert "training up to" not in capsys.readouterr().out
    assert cell.load()["sweep"] == saved["sweep"]

    # the same folder under another budget is refused, naming the file and the field, instead of mixing budgets
    with pytest.raises(ValueError, match=r"model/\S+_s0\.json: saved under another study budget "
                                         r"\(sweep_samples: 8 -> 6\)"):
        bench_vision.main(argv + ["sweep_samples=6"])

    # the convergence stage: every row, constant LR, stopped once the FID levels off
    # (a 50% improvement over the last 2 evaluations is demanded, so the plateau comes at the third evaluation)
    from kflow.utils.io import safe_filename

    bench_vision.main(["--study", "--plateau", "--quick", "--jobs", "1", "--out", str(out), "--set",
                       f"dataset={data}", *MINI, "--plateau-set", "steps=12", "patience=2", "min_improvement=0.5"])
    text = capsys.readouterr().out
    assert "Where each run levelled off" in text and "Validation FID at equal training steps" in text
    assert "; one seed: K-Flow" in text  # the verdict names the single-seed variants too
    cells = sorted(p.name for p in (out / "model").glob("*to_plateau*.json"))
    expected = [("flow matching", 0), ("flow matching", 1), (best, 0), (best, 1)] + [
        (row, 0) for row in KFLOW_ROWS if row != best]  # 2 seeds for FM and the best K-Flow, 1 for the others
    assert cells == sorted(f"{safe_filename(row + ', to plateau')}_s{seed}.json" for row, seed in expected)
    long_fm = json.loads((out / "model" / "flow_matching_to_plateau_s0.json").read_text())
    assert long_fm["stopped_early"] and long_fm["steps_run"] == 6 and long_fm["config"]["min_lr_ratio"] == 1.0
    assert long_fm["latents"] == fm["latents"]
    last = torch.load(out / "work/runs/flow_matching_to_plateau_s0/checkpoints/last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(QUICK.lr)  # a cosine would be at ~57% by now
    assert (out / "figures" / "vision_study_plateau_curves.png").stat().st_size > 1000


def test_budget_differences_ignore_runtime_fields_and_fill_older_records(tmp_path):
    from dataclasses import asdict

    from kflow.utils.io import budget_differences
    from kflow.vision.study import RUNTIME_ONLY, StudyCell, VisionStudyBudget

    budget = VisionStudyBudget()
    saved = asdict(budget)
    assert budget_differences({**saved, "threads": 2}, budget, RUNTIME_ONLY) == []  # speed, not what it measured
    older = {k: v for k, v in saved.items() if k not in ("min_lr_ratio", "min_improvement")}
    assert budget_differences(older, budget) == []  # a record from before these fields had their defaults
    assert budget_differences({**saved, "nfe": [4, 10]}, budget) == ["nfe: (4, 10) -> (4, 10, 20, 50)"]
    assert budget_differences({**saved, "colour": "red"}, budget) == ["unknown field(s) colour"]
    cell = StudyCell("model", "flow matching", 0, tmp_path, tmp_path, budget=budget)
    cell.save({"budget": {**saved, "steps": 10, "threads": 2}})
    with pytest.raises(ValueError, match=r"flow_matching_s0\.json: .* \(steps: 10 -> 6000\)"):
        cell.load()
    assert StudyCell("model", "flow matching", 0, tmp_path, tmp_path).load()["budget"]["steps"] == 10  # unchecked


def test_plateau_is_judged_over_a_window_of_evaluations():
    from kflow.vision.study import plateau_reached

    assert not plateau_reached([10, 9, 8], patience=3)  # too few evaluations to judge
    assert plateau_reached([10, 9, 9.5, 9.2, 9.1], patience=3)  # no new best in the last 3
    assert not plateau_reached([10, 9, 9.5, 9.2, 8.9], patience=3)  # a new best, however small, without a margin
    # with a 1% margin: 9 -> 8.95 over 3 evaluations is a plateau; slow but steady 0.5% per evaluation is not
    assert plateau_reached([10, 9, 8.99, 8.97, 8.95], patience=3, min_improvement=0.01)
    assert not plateau_reached([10, 9, 8.955, 8.91, 8.865], patience=3, min_improvement=0.01)


def test_validation_fid_keeps_the_best_weights_and_stops_on_a_plateau(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kflow.vision.study import VisionStudyBudget
    from kflow.vision.study import model_cells as study

    fids = iter([5.0, 4.0, 4.5, 4.6, 3.0])
    monkeypatch.setattr(study, "frechet_distance", lambda a, b: next(fids))
    monkeypatch.setattr(study, "extract_features", lambda net, images: images)
    ctx = SimpleNamespace(budget=VisionStudyBudget(patience=2, val_samples=4), val_features=None, net=None,
                          balanced_labels=lambda n: torch.zeros(n), images=lambda *a, **k: torch.zeros(4, 2))
    model = torch.nn.Linear(2, 2)
    selector = study._ValidationFID(ctx, tmp_path / "run")
    for step, weight in ((2, 0.0), (4, 1.0)):
        torch.nn.init.constant_(model.weight, weight)
        assert selector(model, None, step) == {"fid": 5.0 if step == 2 else 4.0}
    torch.nn.init.constant_(model.weight, 2.0)
    selector(model, None, 6)  # worse: one evaluation without improvement
    resumed = study._ValidationFID(ctx, tmp_path / "run")  # an interrupted run reads its history back
    with pytest.raises(study.PlateauReached):
        resumed(model, None, 8)  # worse again: patience 2 reached
    state = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert state["best_step"] == 4 and state["best_fid"] == 4.0 and state["stopped"]
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
    assert torch.equal(torch.load(tmp_path / "run" / "best.pt")["weight"], torch.ones(2, 2))  # step 4's weights


def test_verdict_stage_selects_each_models_sampler_and_scores_the_finals(tmp_path, tiny_features, capsys,
                                                                          monkeypatch):
    """Issue 23's verdict stage on a miniature budget (two schedules instead of five): every row with velocity and
    x1 prediction, validation by the latent Fréchet distance of each sampler (the best one kept with the
    checkpoint), test latent FDs per sampler, seed 1 of the two best rows and FIDs of the final cells; resumable."""
    from benchmarks import bench_vision, vision_study
    from benchmarks.vision_study import VERDICT_QUICK, VerdictPlan, _override, final_sampler

    monkeypatch.setattr(vision_study, "VERDICT_SCHEDULES",
                        {"": {}, ", low band to t=1": {"windows": ((0.0, 1.0), (0.5, 1.0))}})
    data = image_folder(tmp_path / "images")
    out = tmp_path / "study"
    mini = [item for item in MINI if not item.startswith("nfe=")]  # the verdict has no Inception NFE sweep
    settings = [f"dataset={data}", *mini, "final_samples=8", "final_reference=16", "val_samples=8"]
    argv = ["--study", "--verdict", "--quick", "--jobs", "1", "--out", str(out), "--set", *settings]
    plan = VerdictPlan(out / "verdict", out / "work", _override(VERDICT_QUICK, settings), out / "figures")
    # a second runner of the study holds one cell: this one skips it and runs the rest
    from kflow.utils.io import FolderLock

    held = plan.model_cell("K-Flow Fourier, x1", 0)
    with FolderLock(held.run_dir, "model.lock", what="study runner"):
        bench_vision.main(argv)
    text = capsys.readouterr().out
    assert f"[{held.slug}] skipped" in text and held.load() is None
    assert f"`{held.slug}`" in text  # listed as not finished
    assert not list((out / "verdict").glob("final/*.json"))  # the finals wait for every seed-0 row
    bench_vision.main(argv)  # the lock released: the held cell, the seed-1 cells and the finals
    text = capsys.readouterr().out
    for heading in ("Every row: validation and test latent FD by sampler", "Final table", "### Verdict"):
        assert heading in text, heading
    assert (out / "figures" / "vision_verdict_overlap_sweep.png").stat().st_size > 0  # the sweep, as a picture
    assert "Samples behind these FIDs" in text and len(list((out / "verdict").glob("final/*_s0.png"))) == 3
    assert len(plan.rows) == 10  # (flow matching + 2 schedules × 2 decompositions) × 2 predictions
    fm = plan.model_cell("flow matching", 0).load()
    assert fm["selection"] == "latent_fd" and fm["sweep"] == {}
    assert set(fm["final"]) == {"euler", "heun", "dopri5"}
    assert fm["final"]["euler"]["nfe"] == 20 and fm["final"]["heun"]["nfe"] == 20 and fm["final"]["dopri5"]["nfe"] > 0
    for entry in fm["history"]:  # the selection score is the latent FD of the best sampler at a matched budget
        matched = [m for m in entry["latent_fd"] if entry["nfe"][m] <= 1.5 * 20] or list(entry["latent_fd"])
        assert entry["fid"] == min(entry["latent_fd"][m] for m in matched) == entry["latent_fd"][entry["sampler"]]
    best_entry = min(fm["history"], key=lambda h: h["fid"])
    assert fm["best_sampler"] == best_entry["sampler"] and fm["best_step"] == best_entry["step"]
    to_one = plan.model_cell("K-Flow Wavelet, low band to t=1, x1", 0).load()
    assert to_one["config"]["windows"] == [[0.0, 1.0], [0.5, 1.0]] and to_one["config"]["prediction"] == "x1"
    compared = plan.compared()
    assert compared[0].startswith("flow matching") and compared[1].startswith("K-Flow")
    assert compared[2].startswith("K-Flow") and compared[2].split()[1] != compared[1].split()[1]

    def test_latent_fd(row):  # the rows compared are picked on the test latents, at each row's final sampler
        result = plan.model_cell(row, 0).load()
        return result["final"][final_sampler(result, plan.budget)]["latent_fd"]

    assert compared[1] == min((r for r in plan.rows if r.startswith("K-Flow")), key=test_latent_fd)
    finals = sorted(p.name for p in (out / "verdict" / "final").glob("*.json"))
    assert len(finals) == 6 and len(list((out / "verdict" / "model").glob("*_s1.json"))) == 3  # both seeds of each
    for row in compared[1:]:  # a verdict line per K-Flow row, on the FID and the latent FD
        assert f"- {row} against {compared[0]}: FID " in text and "test latent FD" in text
    final = json.loads((out / "verdict" / "final" / f"{Path(plan.model_cell(compared[1], 0).slug).name}.json")
                       .read_text())
    scores = plan.model_cell(compared[1], 0).load()["final"]  # the final sampler: best test latent FD, matched NFE
    matched = [m for m in scores if scores[m]["nfe"] <= 1.5 * 20] or list(scores)
    assert final["sampler"] == min(matched, key=lambda m: scores[m]["latent_fd"])
    assert final["samples"] == 8 and final["reference"] == 16 and np.isfinite(final["fid"])

    kept = out / "verdict" / "autoencoder.pt"  # the latent space travels with the results
    assert kept.read_bytes() == (out / "work" / "latents" / "autoencoder.pt").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "verdict").rglob("*.json")}
    bench_vision.main(argv)  # a rerun recomputes nothing
    assert "training up to" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_latent_fd_selection_needs_known_samplers_at_a_matched_budget():
    from kflow.vision.study import VisionStudyBudget, matched_nfe

    assert matched_nfe({"euler": 20, "heun": 20, "dopri5": 111}, 20) == ["euler", "heun"]
    assert matched_nfe({"euler": 20, "dopri5": 28}, 20) == ["euler", "dopri5"]
    assert matched_nfe({"dopri5": 111}, 20) == ["dopri5"]  # nothing matched: every sampler competes

    with pytest.raises(ValueError, match="selection must be one of"):
        VisionStudyBudget(selection="inception")
    with pytest.raises(ValueError, match="val_samplers must name samplers"):
        VisionStudyBudget(val_samplers=("rk4",))
