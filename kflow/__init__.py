"""kflow: K-Flow — flow matching along the K-amplitude (scale) of data.

Subpackages:
    kflow.core       domain-free engine: decompositions, band schedules, interpolant, loss, samplers, training loop
    kflow.molecular  rigid-body molecular assembly (COD-Cluster17)
    kflow.vision     latent image generation with DiT
"""
__version__ = "0.1.0"
