"""Model configuration of rigid-body molecular K-Flow: one dataclass and the builder used by training and loading.

    config = AssemblyModelConfig(num_bands=2)
    model, rigid_flow = build_assembly_model(config)

The config is saved in every checkpoint (``to_dict``) and rebuilt from it (``from_dict``), so a checkpoint always
loads into the network it was trained with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kflow.molecular.data.datasets import START_MIRRORS
from kflow.molecular.model.flow import COUPLINGS, RigidKFlow
from kflow.molecular.model.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.model.objective import ROTATION_LOSSES, TIME_SAMPLINGS

__all__ = ["AssemblyModelConfig", "build_assembly_model", "OBJECTIVES", "GENERATIVE"]

OBJECTIVES = ("flow", "regression")
# Fields added with the generative recipe (2026-12-03) and after it (start_mirror); runs recorded before them used
# their defaults.
RECIPE_FIELDS = ("central", "rotation_loss", "rotation_weight", "time_sampling", "redraw_starts", "start_mirror")


@dataclass
class AssemblyModelConfig:
    """Everything that determines the model's parameters and the flow; saved in every checkpoint.

    Flow: ``num_bands`` (K; 1 = rigid flow matching), band ``ramp``, ``order`` and ``overlap`` of the schedule;
    ``coupling``: which final slot each start molecule flows to in training, "index" (the data's pairing), "ot"
    (an optimal assignment within each cluster) or "eot" (assignment and global rotation of the final cluster,
    ``flow.equivariant_coupling``); see ``flow.collate_clusters``. ``objective``: "flow" (K-Flow, or rigid
    flow matching with K = 1) or "regression" (the same network and loss, trained at t = 0 only and sampled in
    one step: the direct-regression baseline).
    Network: see ``AssemblyNetwork`` for the meaning of each field.
    Generative recipe for starts from the molecule alone (docs/MATH.md §6): ``central`` (the start's molecule 0
    sits at its centre: "eot" pivots on it and pairs it with the crystal's central molecule, and the network marks
    it), ``rotation_loss``/``rotation_weight`` and ``time_sampling`` (``objective.AssemblyLoss``), and
    ``redraw_starts`` (training starts drawn anew every epoch from the stored crystal, ``datasets.RedrawnStarts``),
    and ``start_mirror``: the hands of the start copies, "crystal" (as in the crystal) or, as ``kflow assemble``
    makes a lone molecule's copies, "none" / "half" (``datasets.set_start_hands``; collation then accepts pairs
    of opposite hand). These are saved with the model, so a checkpoint says how it was trained.
    """

    num_bands: int = 2
    ramp: str = "linear"
    order: str = "low_to_high"
    overlap: float = 0.0
    hidden_irreps: str = "32x0e + 8x1o + 8x1e"
    num_atom_layers: int = 1
    num_molecule_layers: int = 2
    intra_cutoff: float = 2.0
    inter_cutoff: float = 4.0
    molecule_cutoff: float = 20.0
    lmax: int = 2
    num_basis: int = 10
    conv: str = "uvu"  # "uvu" depthwise convolutions; "fctp" the fully connected network of kflow <= 0.2
    heavy_atoms_only: bool = True  # atom-level message passing without hydrogens (they ride along rigidly)
    coupling: str = "index"  # "index" | "ot" | "eot": start-to-final pairing used to build training paths
    objective: str = "flow"  # "flow" | "regression" (one-step prediction at t = 0; needs num_bands=1)
    # The network sees the chart offset from the start (True: refinement, where the start is informative) or only
    # the poses at time t (False: a true noise source for starts from the molecule alone; docs/MATH.md §6).
    condition_on_start: bool = True
    central: bool = False
    rotation_loss: str = "chart"  # "chart" | "atoms"
    rotation_weight: float = 1.0
    time_sampling: str = "uniform"  # "uniform" | "band_start"
    redraw_starts: bool = False
    start_mirror: str = "crystal"  # "crystal" | "none" | "half"

    def __post_init__(self):
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.rotation_loss not in ROTATION_LOSSES:
            raise ValueError(f"rotation_loss must be one of {ROTATION_LOSSES}, got {self.rotation_loss!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}")
        if self.start_mirror not in START_MIRRORS:
            raise ValueError(f"start_mirror must be one of {START_MIRRORS}, got {self.start_mirror!r}")
        if not self.rotation_weight >= 0:
            raise ValueError(f"rotation_weight must be >= 0, got {self.rotation_weight}")
        if self.objective == "regression" and self.num_bands != 1:
            raise ValueError(f"objective 'regression' has no bands: num_bands must be 1, got {self.num_bands}")

    def to_dict(self) -> dict:
        return asdict(self)

    def run_record(self) -> dict:
        """``to_dict`` without the generative-recipe fields that hold their defaults: what a run folder records,
        so a run started before those fields existed (they were its defaults) still resumes as the same
        configuration, and ``from_dict`` restores the defaults."""
        record = self.to_dict()
        for key in RECIPE_FIELDS:
            if record[key] == self.__dataclass_fields__[key].default:
                del record[key]
        return record

    @classmethod
    def from_dict(cls, d: dict) -> "AssemblyModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        # Configurations saved before these fields existed describe the all-atom fctp network of kflow <= 0.2
        # (and, without "coupling", index-paired training: the dataclass default).
        known.setdefault("conv", "fctp")
        known.setdefault("heavy_atoms_only", False)
        return cls(**known)


def build_assembly_model(config: AssemblyModelConfig) -> tuple[AssemblyFlowModel, RigidKFlow]:
    """The x1-predicting flow model and the rigid K-Flow (schedule + Laplacian bands) described by ``config``."""
    rigid = RigidKFlow(config.num_bands, ramp=config.ramp, order=config.order, overlap=config.overlap,
                       regression=config.objective == "regression")
    net = AssemblyNetwork(config.hidden_irreps, config.num_atom_layers, config.num_molecule_layers,
                          config.intra_cutoff, config.inter_cutoff, config.molecule_cutoff, config.lmax,
                          config.num_basis, schedule=rigid.schedule, conv=config.conv,
                          heavy_atoms_only=config.heavy_atoms_only, central_feature=config.central)
    return AssemblyFlowModel(net, config.condition_on_start), rigid


# The generative recipe for starts from the molecule alone (docs/MATH.md §6): a network that sees only the poses at
# time t, equivariant OT coupling pivoting on the central molecule (which the network marks), starts redrawn every
# epoch, the pose loss measured on the atoms (no cut at θ = π) and training times concentrated at band starts.
GENERATIVE = dict(coupling="eot", condition_on_start=False, central=True, redraw_starts=True, rotation_loss="atoms",
                  time_sampling="band_start")
