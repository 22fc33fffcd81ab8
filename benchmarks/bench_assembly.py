"""Molecular assembly: quality of identity / rigid FM (K=1) / K-Flow (K=2, 3) with equal budgets over several
seeds on the embedded pyxtal benchmark and CSD-500; network speed; metric speed.

Run from the repository root: python -m benchmarks.bench_assembly [--steps 150 --seeds 0 1 2]
(writes the "assembly" section; --network-only the "assembly-network" section; --metric-speed-only the
"assembly-metric" section; --study [--quick] the converged
study of benchmarks/assembly_study.py, also as python benchmarks/bench_assembly.py --study)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/bench_assembly.py): run as the module, repository importable
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_assembly", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                 os.environ.get("PYTHONPATH")]))})

import numpy as np
import torch

from benchmarks.report import markdown_table, write_section
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.data.datasets import ClusterDataset
from kflow.molecular.model.flow import collate_clusters
from kflow.molecular.evaluation.matching import compute_packing_matching
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.model.sampling import sample_assembly
from kflow.molecular.data.sources import csd500_path
from kflow.molecular.workflow import (METRIC_LABELS, METRICS, evaluate_assembly, load_assembly_dataset,
                                      predict_assembly, train_assembly)
from kflow.utils.io import atomic_write_text


def loop_packing_matching(true, pred, mol, batch):
    """Straightforward per-cluster implementation (numpy), the baseline for the vectorised metric."""
    out = []
    for b in np.unique(batch):
        sel = batch == b
        t, p, m = true[sel], pred[sel], mol[sel]
        dt = np.linalg.norm(t[:, None] - t[None], axis=-1)
        dp = np.linalg.norm(p[:, None] - p[None], axis=-1)
        ct = np.stack([t[m == k].mean(0) for k in range(m.max() + 1)])
        cp = np.stack([p[m == k].mean(0) for k in range(m.max() + 1)])
        out.append((np.sqrt(((dt - dp) ** 2).mean()),
                    np.sqrt(((np.linalg.norm(ct[:, None] - ct[None], axis=-1)
                              - np.linalg.norm(cp[:, None] - cp[None], axis=-1)) ** 2).mean())))
    return out


def bench_metric_speed(store, n_clusters=1000, threads=1):
    """Clusters/s of ``compute_packing_matching`` and of the per-cluster numpy loop on the same clusters, both on
    ``threads`` torch threads (numpy's elementwise loop is single-threaded, so 1 is the like-for-like setting)."""
    from torch_geometric.data import Batch

    items = [store[i % len(store)].to_data() for i in range(n_clusters)]
    batch = Batch.from_data_list(items)
    true, pred = batch.final_positions.double(), batch.initial_positions.double()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    warm = batch.batch < 8
    compute_packing_matching(true[warm], pred[warm], batch.molecule_index[warm], batch.batch[warm])  # warm-up
    t0 = time.perf_counter()
    pm = compute_packing_matching(true, pred, batch.molecule_index, batch.batch)
    ours = time.perf_counter() - t0
    torch.set_num_threads(previous)
    t0 = time.perf_counter()
    ref = loop_packing_matching(true.numpy(), pred.numpy(), batch.molecule_index.numpy(), batch.batch.numpy())
    loop = time.perf_counter() - t0
    err = max(abs(pm.pm_atom[i].item() - ref[i][0]) for i in range(n_clusters))
    return n_clusters / ours, n_clusters / loop, err, float(np.mean([it.num_nodes for it in items]))


def metric_speed_section(store, n_clusters=1000) -> str:
    rows = []
    for threads in (1, 2):
        ours, loop, err, atoms = bench_metric_speed(store, n_clusters, threads)
        rows.append([str(threads), f"{ours:.0f}", f"{loop:.0f}", f"{ours / loop:.1f}×", f"{err:.1e}"])
    load = os.getloadavg()[0]
    return ("## Packing-matching metric (`benchmarks/bench_assembly.py --metric-speed-only`)\n\n"
            f"`compute_packing_matching` on {n_clusters} clusters of the embedded benchmark ({atoms:.0f} atoms each "
            "on average; the PM-atom distance matrices dominate) against a straightforward per-cluster numpy loop "
            "(broadcast distance matrices per cluster, one thread), same clusters, same run. Ours: distances from "
            "the Gram matrix of centred coordinates (BLAS) in cache-sized chunks of clusters, padded per chunk.\n\n"
            + markdown_table(["torch threads (ours)", "ours clusters/s", "numpy loop clusters/s", "speed-up",
                              "max ΔPM-atom (Å)"], rows)
            + f"\n\n1-min load average at the end of the run: {load:.1f} on {os.cpu_count()} cores.")


# The network of kflow 0.2 (fully connected tensor products, graph rebuilt at every sampling step) next to the
# levers of the faster default, one at a time: label -> (AssemblyModelConfig overrides, reuse the graph when sampling)
NETWORK_VARIANTS = {
    "kflow 0.2: fctp, all atoms, graph rebuilt every step": ({"conv": "fctp", "heavy_atoms_only": False}, False),
    "+ fixed graph reused along the path": ({"conv": "fctp", "heavy_atoms_only": False}, True),
    "+ depthwise (uvu) convolutions": ({"conv": "uvu", "heavy_atoms_only": False}, True),
    "+ heavy-atom graph (default)": ({"conv": "uvu", "heavy_atoms_only": True}, True),
}
SAME_WEIGHTS_AS_PREVIOUS_ROW = {"+ fixed graph reused along the path"}  # a sampling-only lever: no quality run


def _median_seconds(variants: dict, work: list, run_once, rounds: int) -> dict:
    """Median wall time per (variant, work item); every item is run for all variants back to back, so a change in
    machine load during the run affects every variant alike."""
    seconds = {label: [] for label in variants}
    for _ in range(rounds):
        for item in work:
            for label, setup in variants.items():
                t0 = time.perf_counter()
                run_once(setup, item)
                seconds[label].append(time.perf_counter() - t0)
    return {label: float(np.median(v)) for label, v in seconds.items()}


def bench_network_speed(store, batch_size=4, num_batches=10, rounds=3, nfe=50, sample_clusters=16,
                        sample_batch_size=8, threads=2):
    """Training and sampling clusters/s of every ``NETWORK_VARIANTS`` entry on the same batches in one run.

    Training: forward + backward + AdamW step of the K-Flow loss on ``num_batches`` fixed training batches.
    Sampling: ``sample_assembly`` at ``nfe`` Euler steps on the first ``sample_clusters`` test clusters (batches of
    ``sample_batch_size``). Untrained weights cost the same as trained ones. Rates come from median times.
    Returns rows of (label, train clusters/s, sample clusters/s, parameters) and the mean atoms per cluster."""
    torch.set_num_threads(threads)
    train = ClusterDataset(store, split="train", seed=0)
    test = ClusterDataset(store, split="test", seed=0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [collate_clusters([train[order[i * batch_size + j]] for j in range(batch_size)])
               for i in range(num_batches)]
    sample_batches = [collate_clusters([test[i] for i in range(s, min(s + sample_batch_size, sample_clusters))])
                      for s in range(0, sample_clusters, sample_batch_size)]
    setups = {}
    for label, (overrides, reuse) in NETWORK_VARIANTS.items():
        torch.manual_seed(0)
        model, rigid = build_assembly_model(AssemblyModelConfig(**overrides))
        setups[label] = (model, rigid, AssemblyLoss(rigid), torch.optim.AdamW(model.parameters(), 1e-3), reuse)

    def train_step(setup, batch):
        model, _, loss_fn, opt, _ = setup
        model.train()
        loss, _ = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample(setup, batch):
        model, rigid, _, _, reuse = setup
        model.eval()
        sample_assembly(model, batch, rigid, steps=nfe, method="euler", reuse_graph=reuse)

    _median_seconds(setups, batches[:2], train_step, 1)  # warm-up: e3nn code generation, allocator
    train_s = _median_seconds(setups, batches, train_step, rounds)
    sample_s = _median_seconds(setups, sample_batches, sample, max(1, rounds - 1))
    atoms = float(np.mean([b.mask.sum().item() / b.num_clusters for b in batches]))
    rows = [(label, batch_size / train_s[label], sample_batch_size / sample_s[label],
             sum(p.numel() for p in setups[label][0].parameters())) for label in setups]
    return rows, atoms


def network_section(store, out: Path, steps=150, sample_steps=10, seeds=(0, 1, 2), batch_size=4) -> str:
    """Side-by-side speed of the network variants, then their quality at equal steps over ``seeds`` (K=2).

    Quality runs are resumable: each seed's metrics are saved to out/network/<variant>_s<seed>/result.json as soon
    as they exist, and a rerun reuses them."""
    speed, atoms = bench_network_speed(store, batch_size=batch_size)
    base_train, base_sample = speed[0][1], speed[0][2]
    speed_rows = [[label, f"{tr:.1f}", f"{tr / base_train:.2f}×", f"{sa:.2f}", f"{sa / base_sample:.2f}×", f"{n:,}"]
                  for label, tr, sa, n in speed]
    test = ClusterDataset(store, split="test", seed=0)
    quality_rows = []
    for label, (overrides, _) in NETWORK_VARIANTS.items():
        if label in SAME_WEIGHTS_AS_PREVIOUS_ROW:
            continue
        per_seed = []
        for seed in seeds:
            run = out / "network" / f"{overrides['conv']}{'_heavy' if overrides['heavy_atoms_only'] else ''}_s{seed}"
            result_file = run / "result.json"
            if not result_file.exists():
                model, rigid, _ = train_assembly(store, run, AssemblyModelConfig(**overrides), steps=steps,
                                                 batch_size=batch_size, seed=seed, split_seed=0, progress=False,
                                                 resume=True)
                preds = predict_assembly(model, rigid, test, steps=sample_steps, seed=seed)
                res = evaluate_assembly(test, preds)
                atomic_write_text(result_file, json.dumps({m: res[m]["mean"] for m in METRICS}))
            per_seed.append(json.loads(result_file.read_text()))
            print("network", label, seed, per_seed[-1], flush=True)
        cells = []
        for m in ("pm_atom", "pm_center", "rmsd15"):
            v = np.array([r[m] for r in per_seed])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        quality_rows.append([label] + cells)
    return ("## Assembly network speed (`python -m benchmarks.bench_assembly --network-only`)\n\n"
            f"All variants in one run on the same 10 training batches of {batch_size} embedded-benchmark clusters "
            f"({atoms:.0f} atoms per cluster on average) and the same 16 test clusters, 2 torch threads, rounds "
            "interleaved across variants batch by batch, rates from median times. Training = forward + backward + "
            "AdamW step of the K=2 loss; sampling = `sample_assembly` at 50 NFE (Euler, batches of 8). Ratios are "
            "against the network of kflow 0.2 measured in the same run.\n\n"
            + markdown_table(["network", "training clusters/s", "ratio", "sampling clusters/s (50 NFE)", "ratio",
                              "parameters"], speed_rows)
            + f"\n\n1-min load average at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
            + f"\n\n**Quality at equal steps** (K=2, {steps} steps of batch {batch_size}, {sample_steps}-step band "
            f"sampler, seeds {list(seeds)}, fixed crystal-level split; mean ± std over seeds of the per-cluster "
            f"mean, {len(test)} test clusters; lower is better)\n\n"
            + markdown_table(["network", "PM-atom (Å)", "PM-center (Å)", "RMSD_15 (Å)"], quality_rows)
            + "\n\nNo GPU row: no accelerator was measured for this table.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" in argv:
        from benchmarks.assembly_study import main as study_main

        return study_main(argv)
    p = argparse.ArgumentParser(description=__doc__)
    # Defaults are the configuration of the published tables, so `make bench` reproduces them.
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--csd-seeds", type=int, nargs="+", default=[0], help="seeds for CSD-500")
    p.add_argument("--draws", type=int, default=4, help="start clusters per crystal (embedded benchmark)")
    p.add_argument("--csd-draws", type=int, default=2, help="start clusters per crystal (CSD-500)")
    p.add_argument("--bands", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--datasets", nargs="+", default=["demo", "csd500"])
    p.add_argument("--out", default="runs/bench_assembly")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--metric-speed-only", action="store_true", help="only the packing-matching speed section")
    p.add_argument("--network-only", action="store_true",
                   help="only the network section: kflow 0.2's network vs the faster levers, speed and quality")
    args = p.parse_args(argv)
    if args.network_only:
        body = network_section(load_assembly_dataset("demo", "data", progress=False), Path(args.out),
                               steps=args.steps, sample_steps=args.sample_steps, seeds=tuple(args.seeds),
                               batch_size=args.batch_size)
        print(body)
        if not args.no_write:
            write_section("assembly-network", body)
        return
    if args.metric_speed_only:
        body = metric_speed_section(load_assembly_dataset("demo", "data", progress=False))
        print(body)
        if not args.no_write:
            write_section("assembly-metric", body)
        return
    out = Path(args.out)
    sections, raw = [], {}
    for name in args.datasets:
        if name == "csd500":
            try:
                csd500_path()
            except FileNotFoundError as err:
                print(f"{err}; skipping CSD-500")
                continue
        store = load_assembly_dataset(name, "data", draws_per_crystal=args.csd_draws if name == "csd500" else args.draws,
                                      progress=False)
        test = ClusterDataset(store, split="test", seed=0)
        train_size = len(ClusterDataset(store, split="train", seed=0))
        results = {"identity": [evaluate_assembly(test)]}
        for k in args.bands:
            label = "rigid FM (K=1)" if k == 1 else f"K-Flow (K={k})"
            results[label] = []
            seeds = args.csd_seeds if name == "csd500" else args.seeds
            for seed in seeds:
                t0 = time.perf_counter()
                model, rigid, _ = train_assembly(store, out / name / f"k{k}_s{seed}",
                                                       AssemblyModelConfig(num_bands=k), steps=args.steps,
                                                       batch_size=args.batch_size, seed=seed, split_seed=0,
                                                       progress=False, resume=True)
                t1 = time.perf_counter()
                preds = predict_assembly(model, rigid, test, steps=args.sample_steps, seed=seed)
                t2 = time.perf_counter()
                results[label].append(evaluate_assembly(test, preds))
                print(name, label, seed, {m: round(results[label][-1][m]["mean"], 3) for m in METRICS},
                      f"train {t1 - t0:.0f}s sample {t2 - t1:.0f}s", flush=True)
        rows = []
        for label, runs in results.items():
            cells = []
            for m in METRICS:
                per_seed = np.array([r[m]["mean"] for r in runs])
                spread = np.array([r[m]["std"] for r in runs]).mean()
                cells.append(f"{per_seed.mean():.3f} ± {per_seed.std():.3f} (σ_clusters {spread:.2f})"
                             if len(runs) > 1 else f"{per_seed.mean():.3f} (σ_clusters {spread:.2f})")
            rows.append([label] + cells)
        title = ("embedded pyxtal benchmark" if name == "demo" else "CSD-500") + (
            f": {len(test)} test clusters of {len(set(test.crystals))} unseen crystals, {train_size} training "
            f"clusters")
        sections.append(f"**{title}**\n\n" + markdown_table(
            ["method"] + [METRIC_LABELS[m] for m in METRICS], rows))
        raw[name] = {label: [{m: r[m]["mean"] for m in METRICS} for r in runs] for label, runs in results.items()}
    body = (
        "## Molecular assembly (`python -m benchmarks.bench_assembly`)\n\n"
        f"Command: `python -m benchmarks.bench_assembly --steps {args.steps} --sample-steps {args.sample_steps} "
        f"--seeds {' '.join(map(str, args.seeds))} --csd-seeds {' '.join(map(str, args.csd_seeds))} "
        f"--draws {args.draws} --csd-draws {args.csd_draws}` (the defaults). "
        f"Equal budget for every model: {args.steps} AdamW steps of {args.batch_size} clusters, default network "
        f"(`AssemblyModelConfig()`), EMA weights, {args.sample_steps}-step band sampler, one sample per cluster. "
        f"Seeds {args.seeds} (CSD-500: {args.csd_seeds}) vary initialisation and data order; the start draws and "
        "the crystal-level split are fixed (data seed 0), so seeds are paired on one test set. Each cell: "
        "mean over seeds of the per-cluster mean ± std over seeds (σ_clusters = spread over test clusters). "
        "Lower is better for every column; identity = the initial cluster unchanged. `mild` start preset, "
        "index-paired training. A short, fixed budget for quick comparisons; the converged study (both start "
        "presets, baselines, 3 seeds everywhere) is the \"assembly-study\" section.\n\n"
        + "\n\n".join(sections)
        + "\n\nSpeed of this network: the \"assembly-network\" section (`--network-only`), measured on an idle "
          "machine.")
    print(body)
    (out).mkdir(parents=True, exist_ok=True)
    (out / "raw.json").write_text(json.dumps(raw, indent=1))
    if not args.no_write:
        write_section("assembly", body)


if __name__ == "__main__":
    main()
