"""Data of rigid-body assembly: crystals in, clusters out, clusters stored and served.

``cluster`` (the ``Cluster`` type and the rejection vocabulary) < ``bounds`` / ``cif`` / ``crystals`` (reading
crystal files) < ``molecules`` (finding molecules) < ``starts`` (start noise) < ``clusters`` (the 17-molecule
cluster) < ``io`` (the COD-Cluster17 CSV format) < ``store`` (the LMDB cluster store) < ``sources`` / ``cod`` (where
clusters come from, builds) < ``datasets`` (splits, torch datasets, start hands).
"""
from kflow.molecular.data.cluster import NUM_MOLECULES, Cluster, InvalidCluster, InvalidCrystal, RejectionSummary
from kflow.molecular.data.clusters import build_cluster, build_clusters
from kflow.molecular.data.crystals import read_crystals
from kflow.molecular.data.datasets import (ClusterDataset, CODCluster17Dataset, RedrawnStarts, StartHands, redraw_start,
                                           set_start_hands, split_indices, with_start_hands)
from kflow.molecular.data.molecules import find_molecules
from kflow.molecular.data.starts import NOISE_PRESETS, NoiseModel, noise_model
from kflow.molecular.data.store import ClusterStore, write_cluster_store

__all__ = ["NUM_MOLECULES", "Cluster", "InvalidCluster", "InvalidCrystal", "RejectionSummary", "build_cluster",
           "build_clusters", "read_crystals", "ClusterDataset", "CODCluster17Dataset", "RedrawnStarts", "StartHands",
           "redraw_start", "set_start_hands", "split_indices", "with_start_hands", "find_molecules", "NOISE_PRESETS",
           "NoiseModel", "noise_model", "ClusterStore", "write_cluster_store"]
