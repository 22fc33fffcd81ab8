"""Physics of molecular clusters: the rigid-body MMFF94 relaxation (``relax``)."""
from kflow.molecular.physics.relax import relax_cluster

__all__ = ["relax_cluster"]
