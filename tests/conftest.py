import os

import pytest
import torch

# Keep the suite deterministic and within 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is several times faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_MODEL_MAX_ATOMS = 40


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised small assembly model packaged like a shipped one (H, C, N, O; at most 40 atoms),
    shared by the tests that run `kflow assemble` and `kflow.molecular.assemble` end to end."""
    from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
    from kflow.molecular.assemble.pretrained import save_pretrained

    torch.manual_seed(0)
    config = AssemblyModelConfig(hidden_irreps="8x0e + 2x1o + 2x1e", num_molecule_layers=1, coupling="ot")
    model, _ = build_assembly_model(config)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_pretrained(path, model, config, {"preset": "hard", "mirror": "none", "elements": [1, 6, 7, 8],
                                          "max_atoms": TINY_MODEL_MAX_ATOMS, "sample_steps": 2, "command": "test"})
    return str(path)
