"""Are the hydrogens there? A molecule known only by its geometry (XYZ, ASE ``Atoms``, pymatgen, CIF, extxyz, ASE
database rows) whose heavy atoms lack the hydrogens their valence needs is refused (``check_hydrogens``).

Why refused rather than completed: ``kflow assemble`` and ``kflow crystal`` move rigid copies of the molecule as
given; added hydrogens would be guesses (positions at standard geometry, tautomers, protonation states) that the
packing then depends on, and every hydrogen bond with them. The user can give what they mean: the molecule with
its hydrogens, or its SMILES (kflow then embeds a complete conformer). Where the input states the bonds (an RDKit
``Mol``, MOL/SDF), the hydrogens the bond graph implies are made explicit by the reader with a note.

How it is seen: RDKit perceives the bonds from the geometry (``rdDetermineBonds.DetermineBonds``, total charge 0,
charged atoms allowed, so zwitterions pass). A molecule missing hydrogens has no neutral closed-shell bonding
(paracetamol without H: "could not find valid bond orders"); where one exists only through triple bonds or
cumulated double bonds, an atom carrying them must be linear (benzene without H comes out as a ring of triple
bonds: its 120° angles show the missing hydrogens). Radicals and net ions fail the same test and are refused with
the same words (kflow packs neutral closed-shell molecules).
"""
from __future__ import annotations

import numpy as np

from kflow.molecular.assemble.inputs import AssemblyInput, InputError
from kflow.molecular.physics.relax import BOND_ORDER_ITERATIONS, bare_molecule


__all__ = ["check_hydrogens", "missing_hydrogens", "LINEAR_ANGLE", "PLANAR_SUM"]


LINEAR_ANGLE = 150.0  # degrees: an atom with a triple bond or two double bonds is straighter than this
PLANAR_SUM = 338.0  # degrees: the three bond angles of an sp2 atom sum to ~360 (CSD-500: >= 341), of an sp3 one to ~329


def _bent_sp_atoms(mol, x: np.ndarray) -> list[int]:
    """Atoms with a triple bond or two double bonds whose two neighbours make an angle below ``LINEAR_ANGLE``."""
    from rdkit import Chem

    bent = []
    for atom in mol.GetAtoms():
        orders = [b.GetBondType() for b in atom.GetBonds()]
        sp = Chem.BondType.TRIPLE in orders or orders.count(Chem.BondType.DOUBLE) >= 2
        if not sp or atom.GetDegree() != 2:
            continue
        a, b = (n.GetIdx() for n in atom.GetNeighbors())
        if _angle(x, atom.GetIdx(), a, b) < LINEAR_ANGLE:
            bent.append(atom.GetIdx())
    return bent


def _angle(x: np.ndarray, centre: int, a: int, b: int) -> float:
    u, v = x[a] - x[centre], x[b] - x[centre]
    cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _underbonded_atoms(mol, x: np.ndarray) -> list[tuple[int, str]]:
    """(atom, why) for each C, N or O whose neighbours and geometry say it carries hydrogens that are not there:
    a carbon with one neighbour (unless a C≡O / C≡N-like bond, < 1.20 Å), with two at an angle below
    ``LINEAR_ANGLE`` (sp² or sp³, not sp), or with three pyramidal (angles summing below ``PLANAR_SUM``); an
    oxygen bonded only to a carbon by a single bond (> 1.32 Å: a hydroxyl, not C=O; CSD-500 has a C=O of 1.31 Å); a nitrogen bonded only to a
    carbon by more than a triple bond's length (> 1.25 Å: an amine or imine, not a nitrile)."""
    found = []
    for atom in mol.GetAtoms():
        i, number, degree = atom.GetIdx(), atom.GetAtomicNum(), atom.GetDegree()
        neighbours = [n.GetIdx() for n in atom.GetNeighbors()]
        length = float(np.linalg.norm(x[neighbours[0]] - x[i])) if degree == 1 else None
        other = mol.GetAtomWithIdx(neighbours[0]).GetAtomicNum() if degree == 1 else None
        if number == 6:
            if degree == 0 or degree == 1 and length > 1.20:
                found.append((i, f"C{i} has {degree} neighbour{'s' if degree != 1 else ''}"))
            elif degree == 2 and (angle := _angle(x, i, *neighbours)) < LINEAR_ANGLE:
                found.append((i, f"C{i} has 2 neighbours at {angle:.0f}°"))
            elif degree == 3:
                a, b, c = neighbours
                total = _angle(x, i, a, b) + _angle(x, i, b, c) + _angle(x, i, a, c)
                if total < PLANAR_SUM:
                    found.append((i, f"C{i} has 3 neighbours, pyramidal"))
        elif number == 8 and degree == 1 and other == 6 and length > 1.32:
            found.append((i, f"O{i} has one single bond ({length:.2f} Å)"))
        elif number == 7 and degree == 1 and other == 6 and length > 1.25:
            found.append((i, f"N{i} has one bond ({length:.2f} Å, no nitrile)"))
    return found


def missing_hydrogens(atomic_numbers, positions) -> str | None:
    """None when every atom's neighbours and geometry need no more hydrogens; else why (one line).

    Connectivity by RDKit (``DetermineConnectivity``) and the rules of ``_underbonded_atoms``; then, where RDKit
    finds bond orders with total charge 0 (``DetermineBonds``; it fails on some molecules with several nitro
    groups, which are then judged by the rules alone), unpaired electrons or a triple or cumulated double bond at
    a bent atom are refused too."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    RDLogger.DisableLog("rdApp.*")
    try:
        connected = bare_molecule(z, x)
        rdDetermineBonds.DetermineConnectivity(connected)
        found = _underbonded_atoms(connected, x)
        if found:
            shown = "; ".join(why for _, why in found[:4]) + (f"; {len(found) - 4} more" if len(found) > 4 else "")
            return f"{len(found)} atom(s) short of bonds for their geometry ({shown})"
        mol = bare_molecule(z, x)
        try:
            try:
                rdDetermineBonds.DetermineBonds(mol, charge=0, embedChiral=False,
                                                maxIterations=BOND_ORDER_ITERATIONS)
            except TypeError:  # RDKit before 2024.03 has no maxIterations
                rdDetermineBonds.DetermineBonds(mol, charge=0, embedChiral=False)
            mol = mol.GetMol()
            Chem.SanitizeMol(mol)
        except Exception:  # no bond orders found: the rules above have spoken
            return None
    finally:
        RDLogger.EnableLog("rdApp.*")
    radicals = [a.GetIdx() for a in mol.GetAtoms() if a.GetNumRadicalElectrons()]
    if radicals:
        return f"RDKit perceives unpaired electrons on atom(s) {', '.join(map(str, radicals[:6]))}"
    bent = _bent_sp_atoms(mol, x)
    if bent:
        return (f"RDKit can bond it only with triple or cumulated double bonds at bent atom(s) "
                f"{', '.join(map(str, bent[:6]))} (angles below {LINEAR_ANGLE:.0f}°)")
    return None


def check_hydrogens(inp: AssemblyInput) -> None:
    """Refuse (``InputError`` reason ``missing_hydrogens``, one line saying how to fix it) a molecule, or a
    crystal's molecule, that lacks hydrogens (see the module docstring)."""
    why = missing_hydrogens(inp.atomic_numbers, inp.positions)
    if why is None:
        return
    hydrogens = int((inp.atomic_numbers == 1).sum())
    what = "the crystal's molecule" if inp.kind == "crystal" else "the molecule"
    fix = ("give a crystal file with its hydrogen positions" if inp.kind == "crystal" else
           "give it with its hydrogens (an SDF or MOL file from your editor) or as SMILES")
    raise InputError(inp.source, "missing_hydrogens", f"{what} {inp.formula} ({hydrogens} H) lacks the hydrogens "
                     f"its atoms' valences need, or is a radical or an ion: {why}. kflow packs the molecule as "
                     f"given and does not guess hydrogen positions; {fix}")
