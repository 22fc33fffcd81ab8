"""Predict molecular packings from Python objects, the way one scripts RDKit or ASE: an RDKit ``Mol``, an ASE
``Atoms`` crystal and a SMILES string go in, ASE ``Atoms`` come out.

    python examples/assemble_objects.py                      # 8 samples each, the model's sampling steps
    python examples/assemble_objects.py --samples 2 --steps 2 --out /tmp/objects   # a quick run (tests/)

kflow reads and writes no file here except in the one ``result.write(...)`` at the end; the crystal comes from
the CSD database shipped inside pyxtal (read-only, through ``ase.db``). Each cell (``# %%``) runs in a notebook.
"""
# %% Imports and settings
import argparse
from pathlib import Path

import ase.db
import numpy as np
import pyxtal
from rdkit import Chem
from rdkit.Chem import AllChem

from kflow.molecular.assemble.api import assemble
from kflow.molecular.assemble.models import AssemblyModel

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--samples", type=int, default=8, help="starts sampled and ranked per input (default: 8)")
parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
parser.add_argument("--out", default="runs/assemble_objects", help="where the crystal's result is written")
args, _ = parser.parse_known_args()  # a notebook kernel passes its own arguments
settings = {"samples": args.samples, "steps": args.steps, "seed": 0}

# %% The model, loaded once and passed to every call (assemble(model="hard") would also load it only once)
model = AssemblyModel.load("hard")

# %% 1. An RDKit Mol with a 3-D conformer; its _Name names the outputs
mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
AllChem.EmbedMolecule(mol, randomSeed=7)
mol.SetProp("_Name", "aspirin")
aspirin = assemble(mol, model=model, **settings)
print(aspirin)

# %% 2. An ASE Atoms crystal: benzene (CSD refcode BENZEN) from pyxtal's database. A periodic Atoms is a crystal:
# its true 17-molecule cluster is built, the start drawn around it, and every prediction scored against it.
database = Path(pyxtal.__file__).parent / "database" / "test.db"
row = ase.db.connect(str(database)).get(csd_code="BENZEN")
crystal = row.toatoms()
crystal.info["name"] = row.csd_code  # a name in info (name, refcode, csd_code, title) names the outputs
benzene = assemble(crystal, model=model, **settings)
print(benzene)
print("against the crystal:", {k: round(v, 2) for k, v in benzene.metrics.items()})

# %% 3. A SMILES string: no file of that name exists, so it is read as SMILES (RDKit conformer, named by formula)
naphthalene = assemble("c1ccc2ccccc2c1", model=model, **settings)
print(naphthalene)

# %% Reading the results as ASE Atoms: predictions are best first, molecule ids in the array "mol_idx"
for result in (aspirin, benzene, naphthalene):
    best = result.predictions[0]
    mol_idx = best.get_array("mol_idx")
    centroids = np.array([best.positions[mol_idx == m].mean(0) for m in range(mol_idx.max() + 1)])
    nearest = np.sort(np.linalg.norm(centroids[1:] - centroids[0], axis=1))[:4]
    score = result.scores[0]
    print(f"{result.name}: {len(best)} atoms in {mol_idx.max() + 1} molecules ({best.get_chemical_formula()}); "
          f"{score['close_contacts']} close contacts; nearest centroids to molecule 0: "
          f"{', '.join(f'{d:.2f}' for d in nearest)} Å")
    for note in result.notes:
        print("  note:", note)

# %% Write one result: the files of `kflow assemble --out` (pred.extxyz, pred.pdb, summary.json, cluster.png, ...)
files = benzene.write(args.out)
print(f"wrote {args.out}/: {', '.join(files)}")
