"""The domain-free K-Flow engine: decompositions, band schedules, interpolant, loss and samplers.

A domain supplies a decomposition and a velocity network; everything else is shared. The vanilla flow-matching
baseline is the same engine with one band and a linear ramp (``KFlow.rectified``). The definitions the code
relies on are written out in docs/MATH.md.
"""
from kflow.core.decompositions import (
    Decomposition,
    FourierDecomposition,
    IdentityDecomposition,
    LaplacianDecomposition,
    PCADecomposition,
    WaveletDecomposition,
    group_into_bands,
)
from kflow.core.embedding import BandTimeEmbedding, sinusoidal_embedding
from kflow.core.flow import PREDICTIONS, SAMPLING_METHODS, KFlow
from kflow.core.schedule import ORDERS, RAMPS, BandSchedule
from kflow.core.steering import ConditionDropping, share_bands
from kflow.core.training import (CheckpointError, ConfigMismatchError, ExponentialMovingAverage, Trainer,
                                 cosine_with_warmup, load_checkpoint)

__all__ = [
    "Decomposition", "IdentityDecomposition", "FourierDecomposition", "WaveletDecomposition", "PCADecomposition",
    "LaplacianDecomposition", "group_into_bands", "BandSchedule", "KFlow", "SAMPLING_METHODS",
    "PREDICTIONS", "ORDERS", "RAMPS",
    "share_bands", "ConditionDropping", "BandTimeEmbedding", "sinusoidal_embedding", "Trainer", "load_checkpoint",
    "CheckpointError", "ConfigMismatchError", "ExponentialMovingAverage", "cosine_with_warmup",
]
