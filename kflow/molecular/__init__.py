"""Rigid-body molecular assembly with K-Flow (COD-Cluster17).

Data: ``Cluster``, ``read_crystals``, ``build_cluster``, ``read_cod_cluster17``/``write_cod_cluster17``,
``rigid_frames``, LMDB-backed ``ClusterDataset``/``CODCluster17Dataset``, ``build_demo_dataset`` (pyxtal's
embedded CSD crystals), ``build_csd500_dataset``, ``build_clusters_from_files`` (scripts/build_clusters.py).
Model: ``RigidKFlow`` (Laplacian bands on the rigid-body chart), ``AssemblyNetwork`` (e3nn), ``AssemblyLoss``,
``sample_assembly``. Metrics: ``compute_packing_matching``, ``collision_rate``, ``separation_rate``, ``rmsd15``.
"""
from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCluster, InvalidCrystal, RejectionSummary
from kflow.molecular.crystals import NoiseModel, build_cluster, build_clusters, find_molecules, read_crystals
from kflow.molecular.datasets import (ClusterDataset, ClusterStore, CODCluster17Dataset, build_cluster_dataset,
                                      build_clusters_from_files, build_csd500_dataset, build_demo_dataset,
                                      split_indices, write_cluster_store)
from kflow.molecular.flow import AssemblyBatch, RigidityError, RigidKFlow, collate_clusters
from kflow.molecular.frames import fit_rigid_motion, rigid_frames
from kflow.molecular.io import check_rigid_consistency, export_cluster, read_cod_cluster17, write_cod_cluster17
from kflow.molecular.metrics import (PackingMatching, aggregate_min_over_repeats, collision_rate,
                                     compute_packing_matching, rmsd15, separation_rate)
from kflow.molecular.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.sampling import sample_assembly
from kflow.molecular.training import AssemblyLoss, AssemblyModelConfig, build_assembly_model

__all__ = [
    "NUM_MOLECULES", "Cluster", "InvalidCluster", "InvalidCrystal", "RejectionSummary", "NoiseModel",
    "build_cluster", "build_clusters", "find_molecules", "read_crystals", "ClusterDataset", "ClusterStore",
    "CODCluster17Dataset", "build_cluster_dataset", "build_clusters_from_files", "build_csd500_dataset",
    "build_demo_dataset", "split_indices", "write_cluster_store", "check_rigid_consistency",
    "AssemblyBatch", "RigidityError", "RigidKFlow", "collate_clusters", "fit_rigid_motion", "rigid_frames",
    "export_cluster", "read_cod_cluster17", "write_cod_cluster17", "PackingMatching", "aggregate_min_over_repeats",
    "collision_rate", "compute_packing_matching", "rmsd15", "separation_rate", "AssemblyFlowModel",
    "AssemblyNetwork", "sample_assembly", "AssemblyLoss", "AssemblyModelConfig", "build_assembly_model",
]
