"""The assembly model: the rigid-body chart, couplings and ``RigidKFlow`` (``flow``), the e3nn velocity network
(``network``), the training loss (``objective``), ``AssemblyModelConfig`` (``config``) and sampling (``sampling``).
"""
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.model.flow import AssemblyBatch, RigidityError, RigidKFlow, collate_clusters
from kflow.molecular.model.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.model.sampling import medoid_sample, predict_assembly, predict_medoid, sample_assembly

__all__ = ["AssemblyModelConfig", "build_assembly_model", "AssemblyBatch", "RigidityError", "RigidKFlow",
           "collate_clusters", "AssemblyFlowModel", "AssemblyNetwork", "AssemblyLoss", "medoid_sample",
           "predict_assembly", "predict_medoid", "sample_assembly"]
