"""Rigid-body relaxation of a molecular cluster against a real force field (RDKit MMFF94, UFF as the fallback).

The M molecules of a cluster are identical rigid copies (same atoms in the same order). Each keeps its shape:
molecule m moves only by a translation t_m and a rotation R(w_m) = exp([w_m]×) about its starting centroid c_m,

    x_mi = c_m + t_m + R(w_m) (x⁰_mi − c_m),

and the 6 M parameters are fitted by L-BFGS-B to the force-field energy of the whole M-molecule system. The
gradient is analytic: the force field's atom gradients g_mi are projected onto each molecule's parameters,
∂E/∂t_m = Σ_i g_mi and ∂E/∂w_m = J_l(w_m)ᵀ Σ_i (x_mi − c_m − t_m) × g_mi (the torque, through the left
Jacobian of SO(3)). Intramolecular terms do not change under a rigid motion, so the total energy is minimised
and the intermolecular energy is reported: E_inter = E_total − Σ_m E_single(x_m).

A local relaxation cannot unlink interpenetrating molecules (a ring threaded by another molecule, planes
crossing): where it stalls with some (an atom pair closer than ``OVERLAP_FACTOR`` × the vdW sum), one molecule of
each such pair is shifted by the least distance that clears it of close contacts and the cluster is relaxed
again; the result is kept if its energy is lower. Every step is a rigid motion of whole molecules.

Bonds are perceived from one molecule's geometry (``rdDetermineBonds.DetermineBonds`` at charge 0, else
``DetermineConnectivity``); the force field is MMFF94 where it has parameters for the molecule, else UFF.
``RelaxResult.force_field`` and ``RelaxResult.bonds`` record which were used. See docs/MATH.md §8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RelaxResult", "ClusterForceField", "RigidBodies", "rigid_objective", "relax_cluster",
           "molecule_from_geometry", "bare_molecule", "overlapping_pairs", "MAX_RELAX_ATOMS", "MAX_RELAX_STEPS",
           "MAX_SEPARATE_ROUNDS"]

FORCE_FIELDS = ("mmff94", "mmff94s", "uff")
NONBONDED_THRESHOLD = 100.0  # Å, MMFF's default: every intermolecular pair of a 17-molecule cluster is kept
UFF_VDW_THRESHOLD = 10.0  # multiples of the pair's vdW distance, UFF's default
BOND_ORDER_ITERATIONS = 10_000  # cap on DetermineBonds' bond-order search, then connectivity only
RESTRAINT = 10.0  # kcal/mol/Å², tether of each molecule's mean square displacement (see relax_cluster)
OVERLAP_FACTOR = 0.6  # molecules interpenetrate: an atom pair closer than this × the sum of vdW radii
CONTACT_FACTOR = 0.75  # ... and are pulled apart until none is closer than this × (assemble's close contact)
STUCK_CHECK = 50  # iterations between two checks for molecules that stay interpenetrating
# The relaxation's own bounds on its cost, whatever a model's metadata allows: atoms of the whole cluster (the pair
# terms and the overlap checks grow as atoms²; 17 molecules of 120 atoms, the shipped models' largest is 94),
# L-BFGS-B iterations per minimisation and rounds of pulling molecules apart (each one more minimisation).
MAX_RELAX_ATOMS = 17 * 120
MAX_RELAX_STEPS = 2000
MAX_SEPARATE_ROUNDS = 5


@dataclass
class RelaxResult:
    """Outcome of :func:`relax_cluster`. Energies in kcal/mol, intermolecular part only.

    positions [N, 3] float64 (input atom order); translations [M, 3] and rotations [M, 3, 3]: the rigid motion of
    each molecule about its starting centroid c_m (x = c_m + t_m + R (x⁰ − c_m)); contacts_*: close contacts of
    ``kflow.molecular.assemble.contact_scores`` (None with ``contacts=False``); steps: L-BFGS-B iterations;
    evaluations: force-field energy + gradient calls; force_field: "mmff94", "mmff94s" or "uff" (the one used);
    bonds: "DetermineBonds", "DetermineConnectivity" (how the molecule's bonds were perceived) or "template";
    separation_rounds: how many times interpenetrating molecules were pulled apart and the cluster relaxed again."""

    positions: torch.Tensor
    energy_before: float
    energy_after: float
    contacts_before: int | None
    contacts_after: int | None
    steps: int
    converged: bool
    force_field: str
    bonds: str
    translations: torch.Tensor
    rotations: torch.Tensor
    evaluations: int = 0
    message: str = ""
    separation_rounds: int = 0


# ------------------------------------------------------------------------------------------------- rotations
def _skew(v: np.ndarray) -> np.ndarray:
    """[M, 3] -> [M, 3, 3] with skew(v) @ x = v × x."""
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2], out[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    out[..., 1, 0], out[..., 2, 0], out[..., 2, 1] = v[..., 2], -v[..., 1], v[..., 0]
    return out


def _rotation_and_jacobian(w: np.ndarray):
    """Rodrigues R = exp([w]×) [M, 3, 3] and the left Jacobian J_l(w) [M, 3, 3] (exp([w + δ]×) ≈ exp([J_l δ]×) R),
    with Taylor coefficients near w = 0."""
    theta2 = (w * w).sum(-1)[:, None, None]
    theta = np.sqrt(theta2)
    small = theta < 1e-4
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 1 - theta2 / 6, np.sin(safe) / safe)  # sin θ / θ
    b = np.where(small, 0.5 - theta2 / 24, (1 - np.cos(safe)) / safe ** 2)  # (1 − cos θ) / θ²
    c = np.where(small, 1 / 6 - theta2 / 120, (safe - np.sin(safe)) / safe ** 3)  # (θ − sin θ) / θ³
    k = _skew(w)
    k2 = k @ k
    eye = np.eye(3)
    return eye + a * k + b * k2, eye + b * k + c * k2


# ---------------------------------------------------------------------------------------------- force field
def bare_molecule(atomic_numbers, positions):
    """An RDKit ``RWMol`` of the atoms alone (no bonds, no implicit hydrogens) with one conformer: what RDKit's
    bond perception (``rdDetermineBonds``) starts from."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    z = [int(a) for a in np.asarray(atomic_numbers).reshape(-1)]
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    rw = Chem.RWMol()
    for number in z:
        atom = Chem.Atom(number)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conf = Chem.Conformer(len(z))
    for i, (px, py, pz) in enumerate(x.tolist()):
        conf.SetAtomPosition(i, Point3D(px, py, pz))
    rw.AddConformer(conf, assignId=True)
    return rw


def molecule_from_geometry(atomic_numbers, positions, charge: int = 0):
    """An RDKit molecule with all atoms explicit and bonds perceived from its 3D geometry.

    ``DetermineBonds`` (bond orders, formal charges, total ``charge``) first; where that fails, connectivity only
    (``DetermineConnectivity``: single bonds, no charges). Returns (mol, "DetermineBonds" |
    "DetermineConnectivity"); raises ValueError when neither gives a sanitizable molecule."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    causes = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for method in ("DetermineBonds", "DetermineConnectivity"):
            mol = bare_molecule(atomic_numbers, positions)
            try:
                if method == "DetermineBonds":
                    try:
                        rdDetermineBonds.DetermineBonds(mol, charge=charge, embedChiral=False,
                                                        maxIterations=BOND_ORDER_ITERATIONS)
                    except TypeError:  # RDKit before 2024.03 has no maxIterations (Boost's ArgumentError)
                        rdDetermineBonds.DetermineBonds(mol, charge=charge, embedChiral=False)
                else:
                    rdDetermineBonds.DetermineConnectivity(mol)
                mol = mol.GetMol()
                Chem.SanitizeMol(mol)
                return mol, method
            except Exception as err:  # RDKit raises several types (ValueError, RuntimeError, its own)
                causes.append(f"{method}: {str(err).strip() or type(err).__name__}")
    finally:
        RDLogger.EnableLog("rdApp.*")
    raise ValueError("cannot perceive the molecule's bonds from its geometry (" + "; ".join(causes) + ")")


class ClusterForceField:
    """Force field of M identical molecules (RDKit MMFF94/UFF with intermolecular terms), energy and gradient
    as numpy functions of the positions [M, P, 3] (molecule-major, each molecule in the template's atom order).

    ``template``: optional RDKit molecule with the molecule's atoms in the same order and explicit hydrogens
    (its bonds and charges are used instead of perceiving them from ``body``)."""

    def __init__(self, atomic_numbers: np.ndarray, body: np.ndarray, num_molecules: int,
                 force_field: str = "mmff94", nonbonded_threshold: float = NONBONDED_THRESHOLD,
                 dielectric: float = 1.0, template=None):
        from rdkit import Chem
        from rdkit.Chem import rdForceFieldHelpers as helpers

        if force_field not in FORCE_FIELDS:
            raise ValueError(f"unknown force field {force_field!r}; use one of {', '.join(FORCE_FIELDS)}")
        if template is not None:
            single, self.bonds = Chem.Mol(template), "template"
            if [a.GetAtomicNum() for a in single.GetAtoms()] != [int(a) for a in atomic_numbers]:
                raise ValueError("the template molecule's atoms differ from the cluster's (number or order)")
        else:
            single, self.bonds = molecule_from_geometry(atomic_numbers, body)
        self.num_molecules, self.num_atoms = num_molecules, single.GetNumAtoms()
        combined = single
        for _ in range(num_molecules - 1):
            combined = Chem.CombineMols(combined, single)
        Chem.SanitizeMol(combined)  # ring information and aromaticity for the typing
        combined.RemoveAllConformers()
        conf = Chem.Conformer(combined.GetNumAtoms())
        combined.AddConformer(conf, assignId=True)  # positions are passed to every call; these are never used
        single.RemoveAllConformers()
        single.AddConformer(Chem.Conformer(self.num_atoms), assignId=True)

        self.force_field, notes = force_field, []
        if force_field.startswith("mmff"):
            variant = "MMFF94s" if force_field == "mmff94s" else "MMFF94"
            if helpers.MMFFHasAllMoleculeParams(single):
                def build(mol):
                    props = helpers.MMFFGetMoleculeProperties(mol, mmffVariant=variant)
                    props.SetMMFFDielectricConstant(float(dielectric))
                    return helpers.MMFFGetMoleculeForceField(mol, props, nonBondedThresh=float(nonbonded_threshold),
                                                             ignoreInterfragInteractions=False)
            else:
                notes.append(f"{variant} has no parameters for the molecule (bonds by {self.bonds})")
                self.force_field = "uff"
        if self.force_field == "uff":
            if not helpers.UFFHasAllMoleculeParams(single):
                notes.append(f"UFF has no parameters for it either")
                raise ValueError("cannot set up a force field for the molecule: " + "; ".join(notes))

            def build(mol):
                return helpers.UFFGetMoleculeForceField(mol, vdwThresh=UFF_VDW_THRESHOLD,
                                                        ignoreInterfragInteractions=False)
        try:
            self._single, self._cluster = build(single), build(combined)
        except Exception as err:
            raise ValueError(f"cannot set up the {self.force_field} force field: {err}") from err
        if self._single is None or self._cluster is None:
            raise ValueError(f"cannot set up the {self.force_field} force field (RDKit returned none)")
        self.notes = notes
        self.evaluations = 0

    def intramolecular(self, positions: np.ndarray) -> float:
        """Σ_m E_single(x_m): the part of the energy a rigid motion leaves unchanged. positions [M, P, 3]."""
        return float(sum(self._single.CalcEnergy(x.ravel().tolist()) for x in positions))

    def energy(self, positions: np.ndarray) -> float:
        """Total energy (kcal/mol) of positions [M, P, 3]."""
        return float(self._cluster.CalcEnergy(positions.ravel().tolist()))

    def energy_and_gradient(self, positions: np.ndarray):
        """Total energy (kcal/mol) and its gradient [M, P, 3] (kcal/mol/Å) at positions [M, P, 3]."""
        flat = positions.ravel().tolist()
        self.evaluations += 1
        energy = float(self._cluster.CalcEnergy(flat))
        grad = np.asarray(self._cluster.CalcGrad(flat), dtype=np.float64).reshape(positions.shape)
        return energy, grad


# ----------------------------------------------------------------------------------------------- rigid model
class RigidBodies:
    """Rigid poses of M molecules of P atoms: parameters p = [t (Å), s·w] per molecule [M, 6], flattened, with
    w the rotation vector about the starting centroid and s the molecule's RMS radius (so both halves are in Å
    and L-BFGS sees a well-scaled problem)."""

    def __init__(self, start: np.ndarray):
        self.centroids = start.mean(1, keepdims=True)  # [M, 1, 3]
        self.body = start - self.centroids  # [M, P, 3]
        radius = np.sqrt((self.body ** 2).sum(-1).mean(-1))  # [M]
        self.scale = np.where(radius > 1e-3, radius, 1.0)[:, None]  # [M, 1]

    def split(self, params: np.ndarray):
        p = params.reshape(-1, 6)
        return p[:, :3], p[:, 3:] / self.scale

    def positions(self, params: np.ndarray) -> np.ndarray:
        t, w = self.split(params)
        rot, _ = _rotation_and_jacobian(w)
        return self.centroids + t[:, None] + np.einsum("mij,mpj->mpi", rot, self.body)

    def pullback(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """dE/dp [6 M] from atom gradients [M, P, 3] at params."""
        t, w = self.split(params)
        rot, jac = _rotation_and_jacobian(w)
        arm = np.einsum("mij,mpj->mpi", rot, self.body)  # x − c − t
        force = grad.sum(1)
        torque = np.cross(arm, grad).sum(1)  # dE/dδ for x → c + t + exp([δ]×) (x − c − t)
        dw = np.einsum("mji,mj->mi", jac, torque) / self.scale
        return np.concatenate([force, dw], 1).ravel()


def rigid_objective(ff: ClusterForceField, bodies: RigidBodies, restraint: float = 0.0):
    """The function L-BFGS-B minimises: params [6 M] -> (E_total + restraint term, dE/dparams [6 M]).

    The restraint term is (k/2) Σ_m msd_m, msd_m the mean square displacement of molecule m's atoms from the
    start (k = ``restraint``, kcal/mol/Å²)."""
    start = bodies.positions(np.zeros(6 * bodies.body.shape[0]))
    size = bodies.body.shape[1]

    def objective(params):
        x = bodies.positions(params)
        energy, grad = ff.energy_and_gradient(x)
        if restraint > 0:
            shift = x - start
            energy = energy + 0.5 * restraint / size * float((shift * shift).sum())
            grad = grad + (restraint / size) * shift
        return energy, bodies.pullback(params, grad)

    return objective


# ------------------------------------------------------------------------------------------------------ relax
def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _as_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _close_contacts(atomic_numbers: torch.Tensor, positions: torch.Tensor, molecule_index: torch.Tensor) -> int:
    from kflow.molecular.evaluation.contacts import contact_scores
    from kflow.molecular.data.cluster import Cluster

    cluster = Cluster(atomic_numbers, molecule_index, positions, positions)
    return int(contact_scores(positions, cluster)["close_contacts"])


def _minimise(ff: ClusterForceField, start: np.ndarray, restraint: float, options: dict, max_shift,
              radii: np.ndarray | None = None):
    """One L-BFGS-B relaxation from ``start`` [M, P, 3]: (positions, total energy, t [M, 3], R [M, 3, 3],
    iterations, converged, message); the start itself (t = 0, R = I) when the optimiser does not end lower.

    With ``radii`` [P], the run stops early when the same molecule pairs still interpenetrate
    (``overlapping_pairs``) at two checks ``STUCK_CHECK`` iterations apart: a local relaxation cannot unlink them,
    and the caller pulls them apart instead of spending the remaining iterations."""
    from scipy.optimize import minimize

    bodies = RigidBodies(start)
    objective = rigid_objective(ff, bodies, restraint)
    p0 = np.zeros(start.shape[0] * 6)
    e0, g0 = objective(p0)
    if not (math.isfinite(e0) and np.isfinite(g0).all()):
        raise ValueError(f"the {ff.force_field} energy of the start is not finite (atoms of different molecules "
                         f"on top of each other?)")
    bounds = None if max_shift is None else [(-max_shift, max_shift)] * p0.size
    state = {"x": p0, "nit": 0, "pairs": None, "stuck": False}

    def callback(intermediate_result):
        state["x"] = np.array(getattr(intermediate_result, "x", intermediate_result), dtype=np.float64)
        state["nit"] += 1
        if radii is not None and state["nit"] % STUCK_CHECK == 0:
            pairs = set(overlapping_pairs(bodies.positions(state["x"]), radii))
            if pairs and pairs == state["pairs"]:
                state["stuck"] = True
                raise StopIteration
            state["pairs"] = pairs

    try:
        res = minimize(objective, p0, jac=True, method="L-BFGS-B", bounds=bounds, options=options,
                       callback=callback)
        params, nit, converged, message = res.x, int(res.nit), bool(res.success), str(res.message)
    except StopIteration:  # SciPy < 1.11 lets the callback's StopIteration through
        params, nit, converged, message = state["x"], state["nit"], False, ""
    if state["stuck"]:
        params, converged = state["x"], False
        message = f"stopped after {nit} iterations: molecules interpenetrate"
    final = bodies.positions(params)
    e1 = ff.energy(final)
    if not (math.isfinite(e1) and e1 <= e0):  # never worse than the start (the restraint is 0 there)
        params, final, e1 = p0, start, e0
    t, w = bodies.split(params)
    rot, _ = _rotation_and_jacobian(w)
    return final, e1, t.copy(), rot, nit, converged, message


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [n, k] between points a [n, 3] and b [k, 3] by one matrix product (no atom loops)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def overlapping_pairs(positions: np.ndarray, radii: np.ndarray, factor: float = OVERLAP_FACTOR):
    """Molecule pairs (a, b), a < b, with an atom pair closer than ``factor`` × (sum of vdW radii), deepest first:
    what a rigid local relaxation leaves when molecules interpenetrate (a ring threaded by another molecule, or
    planes crossing). positions [M, P, 3], radii [P]."""
    m, p, _ = positions.shape
    r = np.tile(radii, m)
    ratio = (_distances(positions.reshape(-1, 3), positions.reshape(-1, 3)) / (r[:, None] + r[None]))
    ratio = ratio.reshape(m, p, m, p).min((1, 3))  # closest approach per molecule pair, in units of the vdW sum
    a, b = np.nonzero(np.triu(ratio < factor, 1))
    return [(int(a[k]), int(b[k])) for k in np.argsort(ratio[a, b], kind="stable")]


def _directions() -> np.ndarray:
    """The 26 unit directions to the faces, edges and corners of a cube [26, 3]."""
    grid = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.abs(grid).sum(1) > 0]
    return grid / np.linalg.norm(grid, axis=1, keepdims=True)


def _separate(positions: np.ndarray, pairs, radii: np.ndarray, factor: float = CONTACT_FACTOR,
              step: float = 0.5) -> np.ndarray:
    """Pull interpenetrating pairs apart: positions [M, P, 3] -> shifted copy. For each pair (deepest first, a
    molecule moves at most once), one of the two is translated by the smallest multiple of ``step`` along one of
    27 directions (the 26 of a cube and the line between the centroids) that leaves it with no close contact
    (``factor`` × vdW sum) with any other molecule; the pair stays as it is where no shift within two molecule
    diameters clears it. Loops run over pairs and shifts, never over atoms."""
    x = positions.copy()
    m, p, _ = x.shape
    moved = set()
    extent = 2 * np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).sum(-1)).max() + 2 * radii.max()
    grid = np.arange(1, int(np.ceil(2 * extent / step)) + 1) * step
    cube = _directions()
    limit = factor * (radii[:, None] + np.tile(radii, m - 1)[None])  # [P, (M-1) P]
    for a, b in pairs:
        if a in moved or b in moved:
            continue
        best = None  # (shift, mover, direction)
        for mover, other in ((a, b), (b, a)):
            line = x[mover].mean(0) - x[other].mean(0)
            norm = np.linalg.norm(line)
            dirs = cube if norm < 1e-3 else np.concatenate([line[None] / norm, cube])
            rest = np.delete(x, mover, axis=0).reshape(-1, 3)
            for shift in grid:
                if best is not None and shift >= best[0]:
                    break
                trial = (x[mover][None] + shift * dirs[:, None]).reshape(-1, 3)  # [D P, 3]
                clear = (_distances(trial, rest).reshape(len(dirs), p, -1) >= limit).all((1, 2))
                if clear.any():
                    best = (float(shift), mover, dirs[int(np.argmax(clear))])
                    break
        if best is not None:
            shift, mover, direction = best
            x[mover] = x[mover] + shift * direction
            moved.update((a, b))
    return x


def _relax(ff: ClusterForceField, numbers: np.ndarray, start: np.ndarray, restraint: float, separate_rounds: int,
           max_steps: int, gtol: float, ftol: float, max_shift):
    """relax_cluster's work on molecule-major positions [M, P, 3] of molecules with atomic numbers [P]: (final,
    E_start, E_final (totals), t, R, steps, converged, message, separation rounds)."""
    from ase.data import vdw_radii

    e0 = ff.energy(start)
    options = {"maxiter": int(max_steps), "gtol": gtol, "ftol": ftol, "maxcor": 20}
    radii = np.nan_to_num(np.asarray(vdw_radii, dtype=np.float64), nan=2.0)[numbers]
    watch = radii if separate_rounds > 0 else None
    final, e1, t, rot, steps, converged, message = _minimise(ff, start, restraint, options, max_shift, watch)
    rounds = 0
    for _ in range(separate_rounds):
        pairs = overlapping_pairs(final, radii)
        if not pairs:
            break
        moved = _separate(final, pairs, radii)
        shifts = moved.mean(1) - final.mean(1)
        last = rounds + 1 == separate_rounds
        trial, e2, t2, rot2, nit2, conv2, msg2 = _minimise(ff, moved, restraint, options, max_shift,
                                                           None if last else watch)
        steps += nit2
        if not e2 < e1:
            break
        # compose: x = c0 + t + R (x0 − c0), then + shift, then about the new centroid by (t2, R2)
        final, e1, t, rot = trial, e2, t + shifts + t2, rot2 @ rot
        converged, message, rounds = conv2, msg2, rounds + 1
    if rounds:
        message = f"{message} (after {rounds} round(s) pulling interpenetrating molecules apart)"
    return final, e0, e1, t, rot, steps, converged, message, rounds


def relax_cluster(atomic_numbers, positions, molecule_index, max_steps: int = 300, force_field: str = "mmff94",
                  restraint: float = RESTRAINT, separate_rounds: int = 2, gtol: float = 0.01, ftol: float = 1e-10,
                  max_shift: float | None = None, dielectric: float = 1.0,
                  nonbonded_threshold: float = NONBONDED_THRESHOLD, contacts: bool = False,
                  template=None) -> RelaxResult:
    """Relax a cluster of identical rigid molecules to a local minimum of a force field's energy.

    Args:
        atomic_numbers: [N] long; molecule_index: [N] long (0..M-1); every molecule has the same atoms in the same
            order (atoms of a molecule need not be contiguous; their order within the molecule is kept).
        positions: [N, 3] float (Å), the starting arrangement; each molecule keeps its shape from here.
        max_steps: most L-BFGS-B iterations per relaxation; gtol (kcal/mol/Å) and ftol: its stopping tolerances on
            the largest (scaled) gradient component and on the relative energy decrease.
        force_field: "mmff94" (default), "mmff94s" or "uff"; MMFF falls back to UFF where it lacks parameters.
        restraint: k (kcal/mol/Å²) of a harmonic tether of each molecule to its start, (k/2) Σ_m msd_m with msd_m
            the mean square atom displacement of molecule m: clashes are resolved, the arrangement is kept (a
            17-molecule cluster in vacuum otherwise contracts and reorients). 0 = free relaxation. Not part of the
            reported energies.
        separate_rounds: interpenetrating molecules (an atom pair closer than ``OVERLAP_FACTOR`` × the vdW sum
            after relaxing) are trapped in a local minimum; up to this many times, each such pair is pulled apart
            (``_separate``: one of the two is shifted by the least distance, along one of 27 directions, that leaves
            it without close contacts) and the cluster is relaxed again from there (tethered to that new start);
            the result is kept if its energy is lower.
        max_shift: optional bound (Å) on each translation component and on each scaled rotation component.
        dielectric: MMFF's constant dielectric (1 = vacuum); nonbonded_threshold: MMFF's non-bonded cutoff (Å;
            the pair list is built once, at the start).
        contacts: also count close contacts before and after (``assemble.contact_scores``; ~0.1–0.5 s each).
        template: optional RDKit molecule for the bonds and charges (same atoms, same order, explicit H).
    Returns: RelaxResult. The energy never increases: if the optimiser ends higher, the start is returned.
    Raises ValueError when the molecules differ, no force field can be set up (the cause is named) or the work is
    out of bounds: more than ``MAX_RELAX_ATOMS`` atoms, ``max_steps`` above ``MAX_RELAX_STEPS`` or
    ``separate_rounds`` above ``MAX_SEPARATE_ROUNDS`` (checked before the force field is built).
    """
    z = _as_numpy(atomic_numbers, np.int64).reshape(-1)
    x = _as_numpy(positions, np.float64)
    mol = _as_numpy(molecule_index, np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != 3 or z.shape[0] != x.shape[0] or mol.shape[0] != x.shape[0]:
        raise ValueError(f"relax_cluster expects atomic_numbers [N], positions [N, 3] and molecule_index [N], got "
                         f"{z.shape}, {x.shape} and {mol.shape}")
    if x.shape[0] == 0 or not np.isfinite(x).all():
        raise ValueError("relax_cluster needs a non-empty cluster with finite positions")
    if mol.min() < 0:
        raise ValueError("molecule_index must be 0..M-1")
    if x.shape[0] > MAX_RELAX_ATOMS:
        raise ValueError(f"{x.shape[0]} atoms in the cluster; the relaxation takes at most {MAX_RELAX_ATOMS} "
                         f"(its cost grows as atoms squared)")
    if not (0 <= max_steps <= MAX_RELAX_STEPS and 0 <= separate_rounds <= MAX_SEPARATE_ROUNDS):
        raise ValueError(f"max_steps must be in 0..{MAX_RELAX_STEPS} and separate_rounds in "
                         f"0..{MAX_SEPARATE_ROUNDS}, got {max_steps} and {separate_rounds}")
    counts = np.bincount(mol)
    num_molecules = counts.size
    if (counts != counts[0]).any():
        raise ValueError(f"the molecules must be identical copies; their atom counts differ: {sorted(set(counts))}")
    order = np.argsort(mol, kind="stable")  # molecule-major, atom order within a molecule kept
    size = int(counts[0])
    zz = z[order].reshape(num_molecules, size)
    if (zz != zz[0]).any():
        bad = int(np.nonzero((zz != zz[0]).any(1))[0][0])
        raise ValueError(f"the molecules must be identical copies (same atoms, same order); molecule {bad} differs "
                         f"from molecule 0")
    start = x[order].reshape(num_molecules, size, 3)

    ff = ClusterForceField(zz[0], start[0], num_molecules, force_field=force_field,
                           nonbonded_threshold=nonbonded_threshold, dielectric=dielectric, template=template)
    # small matrices only: BLAS threads (L-BFGS-B's, the distance products') cost far more than they save
    with _one_blas_thread():
        result = _relax(ff, zz[0], start, restraint, separate_rounds, max_steps, gtol, ftol, max_shift)
    final, e0, e1, t, rot, steps, converged, message, rounds = result
    intra = ff.intramolecular(start)

    out = np.empty_like(x)
    out[order] = final.reshape(-1, 3)
    result_positions = torch.from_numpy(out)
    z_t, mol_t = torch.from_numpy(z), torch.from_numpy(mol)
    before = after = None
    if contacts:
        before = _close_contacts(z_t, torch.from_numpy(x), mol_t)
        after = _close_contacts(z_t, result_positions, mol_t)
    if ff.notes:
        message = "; ".join(ff.notes + [message])
    return RelaxResult(positions=result_positions, energy_before=e0 - intra, energy_after=e1 - intra,
                       contacts_before=before, contacts_after=after, steps=steps, converged=converged,
                       force_field=ff.force_field, bonds=ff.bonds, translations=torch.from_numpy(t),
                       rotations=torch.from_numpy(rot), evaluations=ff.evaluations, message=message,
                       separation_rounds=rounds)
