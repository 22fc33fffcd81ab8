"""Image evaluation: the reference pass is estimated before it starts and cached by content; an FID from too few
images warns. A tiny TorchScript network stands in for Inception-v3 (its features take minutes on CPU)."""
import warnings

import pytest
import torch
from torch import nn

from kflow.vision import metrics, workflow
from kflow.vision.artifacts import write_samples
from kflow.vision.metrics import SmallSampleWarning, fid_sample_note


def tiny_net(path, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))
    torch.jit.script(net).save(str(path))
    return str(path)


def image_set(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    return str(write_samples(path, torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 2))


@pytest.fixture
def calls(monkeypatch):
    """What evaluate_images did, in order: its log lines and each feature pass (by image count)."""
    events = []
    real = workflow.extract_features
    monkeypatch.setattr(workflow, "extract_features",
                        lambda net, images, **kw: events.append(("pass", len(images))) or real(net, images, **kw))
    return events


def evaluate(tmp_path, calls, samples, reference, net, cache="cache"):
    return workflow.evaluate_images(samples, reference, feature_net=net, out=tmp_path / "m.json",
                                    cache_dir=tmp_path / cache, log=lambda line: calls.append(("log", line)))[0]


def test_second_evaluation_reads_the_reference_features_from_the_cache(tmp_path, calls):
    samples, ref = image_set(tmp_path / "s.npz", 16, 0), image_set(tmp_path / "r.npz", 24, 1)
    net = tiny_net(tmp_path / "net.pt")
    with pytest.warns(SmallSampleWarning):
        first = evaluate(tmp_path, calls, samples, ref, net)
    estimate = next(i for i, (kind, line) in enumerate(calls) if kind == "log" and "24 reference images, about" in line)
    assert calls[estimate + 1] == ("pass", 24)  # the estimate is printed before the reference pass starts
    calls.clear()
    with pytest.warns(SmallSampleWarning):
        second = evaluate(tmp_path, calls, samples, ref, net)
    assert [c for c in calls if c[0] == "pass"] == [("pass", 16)]  # only the samples are embedded again
    assert any("from the cache" in line for kind, line in calls if kind == "log")
    assert second["fid"] == first["fid"] and second["precision"] == first["precision"]


def test_cache_key_is_the_content_of_the_images_and_the_network(tmp_path, calls):
    samples = image_set(tmp_path / "s.npz", 16, 0)
    ref, other_ref = image_set(tmp_path / "r.npz", 24, 1), image_set(tmp_path / "r2.npz", 24, 2)
    net, other_net = tiny_net(tmp_path / "net.pt"), tiny_net(tmp_path / "net2.pt", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        evaluate(tmp_path, calls, samples, ref, net)
        for reference, network in ((other_ref, net), (ref, other_net)):  # same shapes, other content: recomputed
            calls.clear()
            evaluate(tmp_path, calls, samples, reference, network)
            assert ("pass", 24) in calls
        cached = sorted((tmp_path / "cache").glob("features_*.pt"))
        assert len(cached) == 3
        for path in cached:  # a damaged cache is recomputed, not trusted
            path.write_bytes(b"not a torch file")
        calls.clear()
        evaluate(tmp_path, calls, samples, ref, net)
        assert ("pass", 24) in calls


def test_fid_from_few_images_warns_and_says_so_in_the_results(tmp_path, calls, monkeypatch):
    samples, ref = image_set(tmp_path / "s.npz", 16, 0), image_set(tmp_path / "r.npz", 24, 1)
    net = tiny_net(tmp_path / "net.pt")
    with pytest.warns(SmallSampleWarning, match="FID from 16 samples is not meaningful: below 2000"):
        result = evaluate(tmp_path, calls, samples, ref, net)
    assert "not meaningful" in result["fid_note"]
    monkeypatch.setattr(metrics, "MIN_FID_SAMPLES", 16)  # enough on both sides now: no warning, no note
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)
        assert "fid_note" not in evaluate(tmp_path, calls, samples, ref, net)


def test_fid_sample_note_names_the_smaller_side():
    assert fid_sample_note(10000, 10000) is None and fid_sample_note(2000, 5000) is None
    assert "FID from 500 reference images" in fid_sample_note(5000, 500)
    assert "FID from 16 samples" in fid_sample_note(16, 10000)


def test_evaluate_image_script_uses_the_cache_folder(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "evaluate_image.py"
    spec = importlib.util.spec_from_file_location("evaluate_image_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    samples, ref = image_set(tmp_path / "s.npz", 16, 0), image_set(tmp_path / "r.npz", 24, 1)
    argv = ["--samples", samples, "--reference", ref, "--feature-net", tiny_net(tmp_path / "net.pt"),
            "--feature-cache", str(tmp_path / "features")]
    with pytest.warns(SmallSampleWarning):
        script.main(argv)
    assert len(list((tmp_path / "features").glob("features_*.pt"))) == 1
    assert "cached in" in capsys.readouterr().out
    with pytest.warns(SmallSampleWarning):
        script.main(argv + ["--no-feature-cache", "--json", str(tmp_path / "n.json")])
    out = capsys.readouterr().out
    assert "not cached (no cache folder)" in out and "fid_note" not in out and "fid:" in out.replace(" ", "")
