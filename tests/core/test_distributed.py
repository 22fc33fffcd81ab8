"""DDP through torchrun on CPU (gloo): 2 processes reproduce one process with the same global batch."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

WORKER = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from kflow.core.training import Trainer
    from kflow.core.distributed import get_rank, get_world_size, sample_batch_times, cleanup_distributed

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(48, 3, generator=g)
            self.y = self.x.sum(-1, keepdim=True) ** 2
        def __len__(self):
            return 48
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    calls = [0]

    def loss_fn(model, batch):
        x, y = batch
        t = sample_batch_times(len(x))  # global-batch times, sliced per rank
        loss = ((model(x) - y).pow(2).squeeze(-1) * (1 + t)).mean()
        calls[0] += 1
        if calls[0] == 4 and get_rank() == get_world_size() - 1:  # only the last rank sees a NaN: all must skip
            loss = loss * float("nan")
        return loss, {}

    out, per_rank = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    trainer = Trainer(model, loss_fn, Data(), collate_fn=collate, batch_size=per_rank, lr=1e-2, max_steps=8,
                      out_dir=out, checkpoint_every=100, progress=False, config={"k": 1})
    trainer.fit()
    cleanup_distributed()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "8"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
                          str(tmp_path / "ddp"), "4"], capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["skipped_steps"] == b["skipped_steps"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    la = [float(ln.split(",")[1]) for ln in (tmp_path / "single" / "metrics.csv").read_text().splitlines()[1:]]
    lb = [float(ln.split(",")[1]) for ln in (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(la) == len(lb) > 0
