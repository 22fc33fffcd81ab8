"""Wall time of `kflow assemble` on one molecule, start-up included (the console command in a fresh process).

Run from the repository root: python -m benchmarks.bench_assemble [--repeats 3]   (writes the "assemble" section)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/bench_assemble.py): run as the module, repository importable
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_assemble", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                 os.environ.get("PYTHONPATH")]))})

from benchmarks.report import markdown_table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = (
    ("molecule (SDF)", ["data/examples/GASXON.sdf"]),
    ("SMILES (RDKit conformer)", ["--smiles", "CC(=O)Oc1ccc2oc(=O)ccc2c1"]),
    ("crystal (CIF, also scored)", ["data/examples/GASXON.cif"]),
)


def time_command(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="kflow-bench-")) / "out"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kflow", "assemble", *args, "--out", str(out), "--samples", "8",
                        "--no-progress"], cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(out.parent)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for label, case in CASES:
        for mode, extra in (("relaxed (default)", []), ("--no-relax", ["--no-relax"])):
            times = sorted(time_command(case + extra, args.repeats))
            rows.append([label, mode, f"{times[len(times) // 2]:.1f}", f"{times[0]:.1f}", f"{times[-1]:.1f}"])
    load = os.getloadavg()[0]
    body = ("## `kflow assemble` speed (`python -m benchmarks.bench_assemble`)\n\n"
            f"`kflow assemble INPUT --samples 8` with the shipped `hard` model and its default sampling steps, "
            f"run as a fresh process (Python start-up, imports and model loading included), {args.repeats} runs "
            "each, with the default MMFF94 rigid-body relaxation of the 8 samples and without it (`--no-relax`), "
            "interleaved in one run; seconds of wall time. The target is ≤ 30 s for a molecule on 2 CPU cores.\n\n"
            + markdown_table(["input", "samples", "median (s)", "fastest (s)", "slowest (s)"], rows)
            + f"\n\n1-min load average at the end of the run: {load:.1f} on {os.cpu_count()} cores "
              "(other work on the machine slows these numbers).")
    print(body)
    if not args.no_write:
        write_section("assemble", body)


if __name__ == "__main__":
    main()
