"""Write the folder of the folder-build reliability benchmark (docs/PROMISES.md, "Measured"), offline: the CIF files
shipped inside the installed pyxtal, ase and pyocse packages, data/examples/GASXON.cif, the 500 CSD-500 crystals
(data/csd500.extxyz.xz) written as P1 CIFs by ASE, and four pathological files: a CIF with a 0.0001 Å cell edge,
a 20,000-atom XYZ (no cell), a 1 KB Fm-3m CIF whose 9984 symmetry copies sit on 8 points and 500 atoms in a 999 Å
P1 cell.

    python benchmarks/reliability_corpus.py /tmp/corpus
    /usr/bin/time -v python scripts/build_clusters.py /tmp/corpus /tmp/corpus/zz_big_20000_atoms.xyz \\
        --out /tmp/corpus_built --workers 1

A folder contributes its .cif files to a build; the XYZ is named as a second input so that it is read too.
"""
import argparse
import importlib.util
import io
import lzma
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE_CIFS = {"pyxtal": "database/cifs", "ase": "test/testdata/minerals", "pyocse": "data"}


def _package_cifs(out: Path) -> int:
    count = 0
    for package, folder in PACKAGE_CIFS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            print(f"{package} is not installed: its CIFs are left out")
            continue
        for path in sorted((Path(next(iter(spec.submodule_search_locations))) / folder).glob("*.cif")):
            shutil.copy(path, out / f"{package}_{path.name}")
            count += 1
    shutil.copy(REPO / "data" / "examples" / "GASXON.cif", out / "GASXON.cif")
    return count + 1


def _csd500_cifs(out: Path) -> int:
    import ase.io

    text = lzma.open(REPO / "data" / "csd500.extxyz.xz", "rt").read()
    frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    for k, atoms in enumerate(frames):
        name = atoms.info.get("NAME") or f"frame{k}"
        atoms.info = {}
        ase.io.write(out / f"csd500_{k:03d}_{name}.cif", atoms, format="cif")
    return len(frames)


def _pathological(out: Path) -> None:
    gasxon = (REPO / "data" / "examples" / "GASXON.cif").read_text().splitlines()
    (out / "zz_tiny_cell.cif").write_text("\n".join("_cell_length_a 0.0001" if line.startswith("_cell_length_a")
                                                    else line for line in gasxon) + "\n")
    grid = np.stack(np.meshgrid(*[np.arange(28)] * 3, indexing="ij"), -1).reshape(-1, 3)[:20_000] * 1.5
    (out / "zz_big_20000_atoms.xyz").write_text("20000\nbig\n" + "".join(f"C {x:.3f} {y:.3f} {z:.3f}\n"
                                                                         for x, y, z in grid))
    head = ("_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
            "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
            "_atom_site_fract_z\n")
    piled = "".join(f"C{k} C 0 0 0\nH{k} H 0.5 0.5 0.5\n" for k in range(26))
    (out / "zz_fm3m_piled_copies.cif").write_text(
        "data_clump\n_cell_length_a 6.0\n_cell_length_b 6.0\n_cell_length_c 6.0\n"
        "_symmetry_space_group_name_H-M 'F m -3 m'\n" + head + piled)
    sites = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)[:500]
    rows = "".join(f"{'CH'[k % 2]}{k} {'CH'[k % 2]} " + " ".join(f"{(5 + 1.5 * v) / 999:.8f}" for v in xyz) + "\n"
                   for k, xyz in enumerate(sites))
    (out / "zz_sparse_999A_box.cif").write_text(
        "data_box\n_cell_length_a 999\n_cell_length_b 999\n_cell_length_c 999\n"
        "_symmetry_space_group_name_H-M 'P 1'\n" + head + rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write (created; must not exist)")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True)
    shipped, csd = _package_cifs(out), _csd500_cifs(out)
    _pathological(out)
    print(f"{out}: {shipped} shipped CIFs, {csd} CSD-500 crystals as CIFs, 4 pathological files")


if __name__ == "__main__":
    main()
