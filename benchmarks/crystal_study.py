"""Crystal structure prediction study on CSD-500 test crystals (issue: from a molecule to ranked crystals).

    python -m benchmarks.crystal_study            # run (resumable: every finished piece is kept and skipped)
    python -m benchmarks.crystal_study --report   # tables from what is saved

Crystals: the test split of the CSD-500 ``hard`` assembly study (42 crystals; ``test_names`` of its saved
results), those with one independent molecule (Z' = 1 by spglib, symprec 0.01), ordered by atoms per molecule
and cut to the ``--crystals`` smallest (cost grows with atoms²; fixed before any result was seen). The molecule
is the crystal's own conformer (molecule 0 of the cell), kept rigid; nothing else of the crystal is used.

Rows (folders under benchmarks/results/crystal_study/):
* ``contacts_<n>``: PyXtal random crystals (n per molecule, the space groups split by CSD share), ranked by
  close contacts then compactness of the cut 17-molecule cluster (no energy);
* ``energy_<n>``: kflow's search (``kflow.molecular.crystal``) with a budget of n candidates per molecule,
  ranked by MMFF94 lattice energy; candidate i is the same for every budget (a budget is a prefix);
* ``learned_hard``: the shipped learned ``hard`` model as ``kflow assemble`` runs it on the crystal (one
  17-molecule cluster, scored the same way), the side-by-side reference for the learned approach;
* ``landscape``: the experimental crystal minimised with the same energy (P1, all poses and the cell free): its
  OXtalign match to itself, volume change, and energy rank among the largest finished energy row's minima.

Each row folder holds <name>/rank_01.cif ... rank_10.cif and <name>/result.json. Scored with OXtalign
(``oxtalign.compare``, n = 15, 1 Å per molecule) against truth/<name>.cif (the CSD-500 crystal, CC BY 4.0).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = ROOT_DEFAULT = Path(__file__).resolve().parent / "results" / "crystal_study"
WORK = ROOT / "_work"  # coarse minima (npz), resumable, not committed
ASSEMBLY_SPLIT = Path(__file__).resolve().parent / "results" / "assembly_study" / "csd500_hard" / "PyXtal_random_crystals_s0.json"
BUDGETS = (100, 300, 1000)
CONTACT_CANDIDATES = 100
TOP = 10
SEED = 0


SECTION_INTRO = """## Crystal structure prediction from the molecule alone (CSD-500 test crystals)

`python -m benchmarks.crystal_study` (resumable; two processes: `--part 0 --parts 2` and `--part 1 --parts 2`),
then `python -m benchmarks.crystal_study --report --rescore` (this section; re-scores every committed CIF with
OXtalign first). Seed 0. Crystals: the 42 test crystals of the CSD-500 `hard` assembly study, the 36 with one
independent molecule (spglib), the 20 with the fewest atoms per molecule (23-42; chosen by cost before any result,
listed in `benchmarks/results/crystal_study/crystals.json`); one of them (EWOBIB, P2₁2₁2) is in a
space group the search does not try. The molecule is the crystal's own conformer, rigid. Rows: `contacts_100`,
PyXtal random crystals (100 per molecule, the same space-group split) ranked by close contacts, no energy;
`energy_<n>`, kflow's search (`kflow.molecular.crystal`, docs/MATH.md §9) with n candidates, ranked by MMFF94
lattice energy; `learned_hard`, the shipped learned model as `kflow assemble` runs it (first-ranked of 8 relaxed
samples, one cluster). Success@k: share of the crystals whose k best-ranked predictions include one with at least
8 (12, 15) of 15 molecules matched by OXtalign (1 Å). The top-10 CIFs of every row are committed under
`benchmarks/results/crystal_study/<row>/<name>/`, the truth CIFs under `truth/`. Times on this 2-core machine with
two study processes and other work running (one torch thread each)."""


def set_root(root: Path) -> None:
    global ROOT, WORK
    ROOT, WORK = Path(root), Path(root) / "_work"


def _save_json(path: Path, data) -> None:
    from kflow.utils.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=float) + "\n")


def select_crystals(count: int) -> list[dict]:
    """The study's crystals (saved once to crystals.json, then read back: the choice never changes)."""
    import spglib

    from kflow.molecular.data.crystals import read_crystals
    from kflow.molecular.data.molecules import find_molecules
    from kflow.molecular.data.sources import csd500_path

    saved = ROOT / "crystals.json"
    if saved.exists():
        return json.loads(saved.read_text())["crystals"][:count]
    names = sorted({n.rsplit("_draw", 1)[0] for n in json.loads(ASSEMBLY_SPLIT.read_text())["test_names"]})
    rows = []
    for name, atoms in read_crystals(csd500_path()):
        if name not in names:
            continue
        molecules = find_molecules(atoms)
        data = spglib.get_symmetry_dataset((atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers),
                                           symprec=1e-2)
        z = len(molecules.positions)
        rows.append({"name": name, "space_group": data.international, "z": z, "z_prime": z / len(data.rotations),
                     "atoms": int(len(molecules.atomic_numbers))})
    rows.sort(key=lambda r: (r["atoms"], r["name"]))
    used = [r for r in rows if r["z_prime"] == 1]
    _save_json(saved, {"test_crystals": len(rows), "z_prime_1": len(used), "crystals": used,
                       "rule": "CSD-500 hard test split, Z'=1 (spglib symprec 0.01), fewest atoms per molecule first"})
    return used[:count]


def load_truth(name: str):
    """(RigidCrystal of the CSD-500 crystal, its truth CIF path); the CIF is written once (P1, every atom)."""
    from kflow.molecular.crystal.structure import RigidCrystal
    from kflow.molecular.data.crystals import read_crystals
    from kflow.molecular.data.molecules import find_molecules
    from kflow.molecular.data.sources import csd500_path

    for found, atoms in read_crystals(csd500_path()):
        if found == name:
            crystal = RigidCrystal.from_molecules(name, find_molecules(atoms))
            path = ROOT / "truth" / f"{name}.cif"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                crystal.write_cif(path)
            return crystal, path
    raise KeyError(name)


def write_row(row: str, name: str, crystals, truth, extra: dict) -> dict:
    from kflow.molecular.assemble.crystals import score_against

    folder = ROOT / row / name
    folder.mkdir(parents=True, exist_ok=True)
    scores = score_against(crystals, truth)  # OXtalign + matched PM-center, as kflow crystal scores
    for rank, crystal in enumerate(crystals, 1):
        crystal.write_cif(folder / f"rank_{rank:02d}.cif")
    ranked = [{**{k: v for k, v in c.info.items() if isinstance(v, (int, float, str))}, **s}
              for c, s in zip(crystals, scores)]
    result = {"row": row, "name": name, "ranked": ranked, **extra}
    _save_json(folder / "result.json", result)
    return result


def forcefield_of(truth):
    from kflow.molecular.physics.mmff import MoleculeForceField

    return MoleculeForceField.from_geometry(truth.atomic_numbers, truth.body)


def run_energy(name: str, budget: int) -> None:
    from kflow.molecular.crystal.relax import crystal_energy
    from kflow.molecular.crystal.search import SearchSettings, allocate_budget, coarse_minima, refine_minima
    from kflow.molecular.data.molecules import estimate_volume_per_molecule

    if (ROOT / f"energy_{budget}" / name / "result.json").exists():
        return
    truth, truth_cif = load_truth(name)
    ff = forcefield_of(truth)
    volume = estimate_volume_per_molecule(truth.atomic_numbers, truth.body)
    settings = SearchSettings(candidates=budget, seed=SEED)
    start = time.perf_counter()
    pools = {}
    coarse_seconds = 0.0
    for symbol, count in allocate_budget(budget).items():
        parts, done = [], 0
        for path in sorted((WORK / name).glob(f"{symbol.replace('/', '_')}_*.npz"),
                           key=lambda p: int(p.stem.rsplit("_", 1)[1])):
            stop = int(path.stem.rsplit("_", 1)[1])
            if stop <= count:
                with np.load(path) as data:
                    parts.append({k: data[k] for k in data.files})
                coarse_seconds += float(parts[-1]["seconds"])
                done = stop
        while done < count:  # the missing candidates, in chunks saved as they finish
            stop = min(count, done + settings.batch_size)
            t0 = time.perf_counter()
            part = coarse_minima(ff, volume, symbol, done, stop, settings)
            part["seconds"] = np.array(time.perf_counter() - t0)
            (WORK / name).mkdir(parents=True, exist_ok=True)
            tmp = WORK / name / f"{symbol.replace('/', '_')}_{stop}.tmp.npz"
            np.savez(tmp, **part)
            tmp.rename(WORK / name / f"{symbol.replace('/', '_')}_{stop}.npz")
            coarse_seconds += float(part["seconds"])
            parts.append(part)
            done = stop
        if parts:
            pools[symbol] = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]
                             if k != "seconds"}
    t0 = time.perf_counter()
    crystals = refine_minima(ff, pools, settings, name)
    refine_seconds = time.perf_counter() - t0
    write_row(f"energy_{budget}", name, crystals, truth,
              {"budget": budget, "coarse_seconds": coarse_seconds, "refine_seconds": refine_seconds,
               "seconds_per_candidate": (coarse_seconds + refine_seconds) / budget,
               "space_groups": allocate_budget(budget), "wall_seconds": time.perf_counter() - start,
               "truth_energy": crystal_energy(ff, truth, **settings.fine)})
    print(f"energy_{budget} {name}: {coarse_seconds + refine_seconds:.0f} s", flush=True)


def run_contacts(name: str, candidates: int = CONTACT_CANDIDATES) -> None:
    """PyXtal random crystals in the same space groups (split by CSD share), ranked by contacts, no energy."""
    import contextlib
    import io
    import warnings

    from kflow.molecular.baselines.pyxtal import _pyxtal_molecule, _random_crystal
    from kflow.molecular.crystal.search import allocate_budget
    from kflow.molecular.crystal.structure import RigidCrystal
    from kflow.molecular.data.cluster import Cluster
    from kflow.molecular.data.molecules import Molecules, estimate_volume_per_molecule
    from kflow.molecular.evaluation.contacts import contact_scores

    row = f"contacts_{candidates}"
    if (ROOT / row / name / "result.json").exists():
        return
    truth, truth_cif = load_truth(name)
    volume = estimate_volume_per_molecule(truth.atomic_numbers, truth.body)
    molecule = _pyxtal_molecule(truth.atomic_numbers, truth.body)
    start = time.perf_counter()
    found, failed = [], 0
    k = 0
    for symbol, count in allocate_budget(candidates).items():
        for _ in range(count):
            rng = np.random.default_rng([SEED, k])
            k += 1
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    positions, cell = _random_crystal(molecule, symbol.replace("_", ""), volume, rng, 10)
                crystal = RigidCrystal.from_molecules(name, Molecules(truth.atomic_numbers, positions, cell))
            except Exception:  # pyxtal fails on some draws: counted, skipped
                failed += 1
                continue
            cluster = torch.as_tensor(crystal.cluster(17)).reshape(-1, 3)
            index = torch.arange(17).repeat_interleave(len(truth.atomic_numbers))
            z = torch.as_tensor(np.tile(truth.atomic_numbers, 17))
            s = contact_scores(cluster, Cluster(z, index, cluster, cluster))
            found.append((s["close_contacts"], s["radius_of_gyration"],
                          crystal.with_info(space_group=symbol, close_contacts=s["close_contacts"],
                                            radius_of_gyration=s["radius_of_gyration"], density=crystal.density)))
    found.sort(key=lambda f: (f[0], f[1]))
    crystals = [f[2].with_info(rank=i + 1) for i, f in enumerate(found[:TOP])]
    seconds = time.perf_counter() - start
    write_row(row, name, crystals, truth, {"candidates": candidates, "failed": failed,
                                                       "seconds": seconds, "seconds_per_candidate": seconds / candidates})
    print(f"{row} {name}: {seconds:.0f} s", flush=True)


def run_learned(name: str, model: str = "hard", samples: int = 8) -> None:
    """The shipped learned model as ``kflow assemble`` runs it on the crystal (its molecule, starts drawn as the
    model's training starts, 8 samples, MMFF-relaxed, ranked by contacts then energy): its first-ranked
    17-molecule cluster scored with OXtalign against the crystal, for the side-by-side with the energy rows."""
    from kflow.molecular.assemble.api import assemble

    row = f"learned_{model}"
    if (ROOT / row / name / "result.json").exists():
        return
    truth, truth_cif = load_truth(name)
    start = time.perf_counter()
    result = assemble(str(truth_cif), samples=samples, model=model, seed=SEED, progress=False)
    seconds = time.perf_counter() - start
    metrics = result.metrics
    entry = {"rank": 1, "n_matched": int(metrics["matched15"]),
             "rmsd15": float("nan") if metrics["rmsd15"] is None else float(metrics["rmsd15"]),
             "pm_center_matched": float(metrics["pm_center_matched"])}
    _save_json(ROOT / row / name / "result.json", {"row": row, "name": name, "ranked": [entry], "seconds": seconds,
                                                   "samples": samples, "model": model})
    print(f"{row} {name}: {entry['n_matched']}/15, PM-center matched {entry['pm_center_matched']:.2f}", flush=True)


def run_landscape(name: str) -> None:
    import oxtalign

    from kflow.molecular.crystal.relax import relax_crystal
    from kflow.molecular.crystal.search import SearchSettings

    if (ROOT / "landscape" / name / "result.json").exists():
        return
    truth, truth_cif = load_truth(name)
    ff = forcefield_of(truth)
    settings = SearchSettings()
    start = time.perf_counter()
    relaxed = relax_crystal(ff, truth, **settings.fine)
    folder = ROOT / "landscape" / name
    folder.mkdir(parents=True, exist_ok=True)
    relaxed.write_cif(folder / "relaxed.cif")
    self_match = oxtalign.compare(oxtalign.from_ase(relaxed.to_ase()), oxtalign.load(str(truth_cif)), n=15)
    _save_json(folder / "result.json", {
        "name": name, "energy_before": relaxed.info["energy_before"], "energy": relaxed.info["energy"],
        "volume_change": relaxed.info["volume_change"], "density": relaxed.density, "truth_density": truth.density,
        "self_n_matched": int(self_match.n_matched), "self_rmsd15": float(self_match.rmsd_n),
        "steps": relaxed.info["steps"], "seconds": time.perf_counter() - start})
    print(f"landscape {name}: {relaxed.info['energy_before']:.1f} -> {relaxed.info['energy']:.1f} kcal/mol, "
          f"volume {100 * relaxed.info['volume_change']:+.1f} %, self {self_match.n_matched}/15", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crystals", type=int, default=20)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--report", action="store_true", help="tables (and BENCHMARKS.md) from the saved results")
    parser.add_argument("--rescore", action="store_true", help="with --report: re-score every committed CIF first")
    parser.add_argument("--part", type=int, default=0, help="run crystals i with i %% parts == part")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--root", type=Path, default=ROOT, help="results folder (tests use a temporary one)")
    parser.add_argument("--stages", nargs="+", default=None,
                        help="run only these stages (energy, landscape, contacts, learned); default: all")
    args = parser.parse_args(argv)
    set_root(args.root)
    torch.set_num_threads(1)
    crystals = select_crystals(args.crystals)
    if args.report:
        from benchmarks.crystal_report import plot_study, report, rescore
        from benchmarks.report import write_section

        rescored = ""
        if args.rescore:
            changed, total = rescore(ROOT, [c["name"] for c in crystals])
            rescored = (f"\n\nRe-scored from the committed CIFs (OXtalign reading the files against `truth/`): "
                        f"{changed} of {total} scores differ from the ones saved when the crystals were made "
                        f"(in memory), each by one molecule at a borderline match.")
            print(rescored.strip())
        figure = Path(__file__).resolve().parents[1] / "docs" / "figures" / "crystal_study_matched.png"
        plot_study(ROOT, crystals, figure)
        body = report(crystals)
        print(body)
        if args.root == ROOT_DEFAULT:
            write_section("crystal-study", SECTION_INTRO + "\n\n" + body + rescored +
                          "\n\n![best matched per crystal](docs/figures/crystal_study_matched.png)")
        return
    mine = [c["name"] for i, c in enumerate(crystals) if i % args.parts == args.part]
    stages = [("energy", args.budgets[0]), ("landscape", None), ("contacts", None), ("learned", None)]
    stages += [("energy", b) for b in args.budgets[1:]]
    if args.stages:
        stages = [(s, b) for s, b in stages if s in args.stages]
    for stage, budget in stages:
        for name in mine:
            try:
                if stage == "energy":
                    run_energy(name, budget)
                elif stage == "landscape":
                    run_landscape(name)
                elif stage == "learned":
                    run_learned(name)
                else:
                    run_contacts(name)
            except Exception as err:  # one crystal's failure is recorded, the study goes on
                _save_json(ROOT / "_failures" / f"{stage}_{budget}_{name}.json", {"error": repr(err)})
                print(f"FAILED {stage} {budget} {name}: {err!r}", flush=True)


if __name__ == "__main__":
    main()
