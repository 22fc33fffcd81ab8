"""The README's "Image generation in 5 minutes" commands, run through the scripts' main(argv) as written, with only
the budget shrunk (scikit-learn digits instead of Fashion-MNIST, a few steps, a tiny stand-in for Inception-v3):
every flag of the recipe still exists and the steps fit together (the optional flow-matching run reuses the latents)."""
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kflow.vision.metrics import SmallSampleWarning

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

# per script: option -> the value the test uses instead of the README's
SHRINK = {"train_image": {"--dataset": "digits", "--ae-steps": "3", "--ae-width": "4", "--steps": "2",
                          "--batch-size": "8"},
          "sample_image": {"--num": "4", "--steps": "2"},
          "evaluate_image": {"--max-reference": "12"}}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def recipe_commands() -> list[list[str]]:
    section = (ROOT / "README.md").read_text().split("### Image generation in 5 minutes", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("python ")]


def shrunk(argv: list[str], script: str, tmp_path: Path) -> list[str]:
    out = [str(tmp_path / a) if a.startswith("runs/") else a for a in argv]
    for option, value in SHRINK[script].items():
        assert option in out, f"{script}: the README recipe no longer passes {option}"
        out[out.index(option) + 1] = value
    return out


def test_the_five_minute_image_recipe_runs_as_written(tmp_path):
    commands = recipe_commands()
    scripts = [Path(c[1]).stem for c in commands]
    assert scripts == ["train_image", "sample_image", "evaluate_image", "train_image"]  # K-Flow, sample, eval, FM
    torch.manual_seed(0)
    net = tmp_path / "net.pt"
    torch.jit.script(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))).save(str(net))
    for command, script in zip(commands, scripts):
        argv = shrunk(command[2:], script, tmp_path)
        if script == "evaluate_image":  # digits instead of Fashion-MNIST, the tiny network, a private cache
            argv += ["--reference", "digits-test", "--feature-net", str(net), "--feature-cache", str(tmp_path / "c")]
        module = __import__(script)
        if script == "evaluate_image":
            with pytest.warns(SmallSampleWarning):  # the recipe's FID is flagged as not meaningful
                module.main(argv)
        else:
            module.main(argv + ["--no-progress"] if script == "train_image" else argv)
    grid = tmp_path / "runs/quick_kflow/grid.png"
    assert grid.stat().st_size > 100
    metrics = json.loads((tmp_path / "runs/quick_kflow/grid.metrics.json").read_text())
    assert metrics["num_samples"] == 4 and "not meaningful" in metrics["fid_note"]
    for run in ("quick_kflow", "quick_fm"):  # both runs on the one autoencoder of the shared latent folder
        record = json.loads((tmp_path / "runs" / run / "image_config.json").read_text())
        assert record["latent_dir"] == str(tmp_path / "runs/quick_latents")
    assert (tmp_path / "runs/quick_latents/autoencoder.pt").is_file()
    assert not (tmp_path / "runs/quick_fm/autoencoder.pt").exists()
