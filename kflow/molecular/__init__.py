"""Rigid-body molecular assembly with K-Flow (COD-Cluster17).

Data (``data``): ``Cluster``, ``read_crystals``, ``build_cluster``, ``read_cod_cluster17``/``write_cod_cluster17``
(raw CSV files), ``ClusterStore`` (pickle-free LMDB store), ``ClusterDataset``/``CODCluster17Dataset`` with
crystal-level splits, sources ``build_demo_dataset`` (pyxtal's embedded CSD crystals), ``build_csd500_dataset``,
``build_clusters_from_files``. Geometry: ``rigid_frames``, ``fit_rigid_motion``, ``kabsch``.
Model (``model``): ``AssemblyModelConfig`` + ``build_assembly_model``, ``RigidKFlow`` (Laplacian bands on the
rigid-body chart), ``AssemblyNetwork`` (e3nn), ``AssemblyLoss``, ``sample_assembly``/``predict_assembly``.
Metrics (``evaluation``): ``compute_packing_matching``, ``collision_rate``, ``separation_rate``, ``rmsd15``; the field's
packing metric (OXtalign): ``packing_match``, ``cluster_packing_match``.
Workflow: ``load_assembly_dataset``, ``train_assembly``, ``load_assembly_model``, ``evaluate_assembly``.
Pretrained models: ``load_pretrained`` (a shipped name or a file), ``save_pretrained``, ``list_pretrained``; one
molecule or crystal end to end: ``kflow.molecular.assemble.assemble`` (``kflow assemble``).
See docs/ARCHITECTURE.md for the rooms, what each owns and the layer order.
"""
from kflow.molecular.artifacts import load_assembly_model, read_predictions, write_predictions
from kflow.molecular.assemble.pretrained import list_pretrained, load_pretrained, save_pretrained
from kflow.molecular.baselines.pyxtal import pyxtal_predictions
from kflow.molecular.baselines.shell import shell_predictions
from kflow.molecular.data.cluster import NUM_MOLECULES, Cluster, InvalidCluster, InvalidCrystal, RejectionSummary
from kflow.molecular.data.clusters import build_cluster, build_clusters
from kflow.molecular.data.crystals import read_crystals
from kflow.molecular.data.datasets import (ClusterDataset, CODCluster17Dataset, RedrawnStarts, StartHands, redraw_start,
                                           set_start_hands, split_indices, with_start_hands)
from kflow.molecular.data.io import check_rigid_consistency, export_cluster, read_cod_cluster17, write_cod_cluster17
from kflow.molecular.data.molecules import find_molecules
from kflow.molecular.data.sources import (build_cluster_dataset, build_clusters_from_files, build_csd500_dataset,
                                          build_demo_dataset)
from kflow.molecular.data.starts import NoiseModel
from kflow.molecular.data.store import ClusterStore, write_cluster_store
from kflow.molecular.evaluation.collisions import collision_rate, separation_rate
from kflow.molecular.evaluation.matching import PackingMatching, aggregate_min_over_repeats, compute_packing_matching
from kflow.molecular.evaluation.oxtal import cluster_packing_match, packing_match
from kflow.molecular.evaluation.rmsd import rmsd15
from kflow.molecular.geometry import fit_rigid_motion, kabsch, rigid_frames
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.model.flow import AssemblyBatch, RigidityError, RigidKFlow, collate_clusters
from kflow.molecular.model.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.model.sampling import medoid_sample, predict_assembly, predict_medoid, sample_assembly
from kflow.molecular.physics.lattice import LatticeEnergy
from kflow.molecular.physics.mmff import MoleculeForceField
from kflow.molecular.physics.relax import relax_cluster
from kflow.molecular.crystal import RigidCrystal, SearchSettings, search_crystals, space_group
from kflow.molecular.assemble.crystals import CrystalPrediction, predict_crystals
from kflow.molecular.workflow import evaluate_assembly, load_assembly_dataset, train_assembly

__all__ = [
    "NUM_MOLECULES", "Cluster", "InvalidCluster", "InvalidCrystal", "RejectionSummary", "NoiseModel",
    "build_cluster", "build_clusters", "find_molecules", "read_crystals", "ClusterDataset", "ClusterStore",
    "CODCluster17Dataset", "build_cluster_dataset", "build_clusters_from_files", "build_csd500_dataset",
    "build_demo_dataset", "split_indices", "write_cluster_store", "check_rigid_consistency",
    "AssemblyBatch", "RigidityError", "RigidKFlow", "collate_clusters", "fit_rigid_motion", "rigid_frames", "kabsch",
    "export_cluster", "read_cod_cluster17", "write_cod_cluster17", "PackingMatching", "aggregate_min_over_repeats",
    "collision_rate", "compute_packing_matching", "rmsd15", "separation_rate", "AssemblyFlowModel",
    "AssemblyNetwork", "sample_assembly", "predict_assembly", "AssemblyLoss", "AssemblyModelConfig",
    "build_assembly_model", "load_assembly_model", "read_predictions", "write_predictions", "load_assembly_dataset",
    "train_assembly", "evaluate_assembly", "load_pretrained", "save_pretrained", "list_pretrained",
    "RedrawnStarts", "redraw_start", "shell_predictions", "pyxtal_predictions", "packing_match", "cluster_packing_match",
    "relax_cluster", "medoid_sample", "predict_medoid", "StartHands", "set_start_hands", "with_start_hands",
    "LatticeEnergy", "MoleculeForceField", "RigidCrystal", "SearchSettings", "search_crystals", "space_group",
    "CrystalPrediction", "predict_crystals",
]
