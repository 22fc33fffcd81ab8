"""Predict how one molecule packs: the application behind ``kflow assemble`` (``assemble(x) -> AssemblyResult``).

``inputs`` (``AssemblyInput``, ``InputError``, checks) < ``readers`` (molecules and crystals from objects, files and
SMILES) < ``pretrained`` (the pretrained-model file format) < ``models`` (``AssemblyModel``, the model cache) <
``starts`` (start clusters of an input) < ``predict`` (sampling, snapping, relaxation, truth metrics) < ``outputs``
(the output folder and picture) < ``api`` (``assemble``, ``AssemblyResult``; the whole pipeline is described there).
"""
from kflow.molecular.assemble.api import RIGID_TOLERANCE, AssemblyResult, assemble
from kflow.molecular.assemble.inputs import AssemblyInput, InputError, check_input
from kflow.molecular.assemble.models import DEFAULT_MODEL, DEFAULT_SAMPLES, AssemblyModel, clear_model_cache
from kflow.molecular.assemble.outputs import OUTPUT_FILES, plot_clusters, write_assembly_outputs
from kflow.molecular.assemble.predict import predict_clusters, truth_metrics
from kflow.molecular.assemble.readers import molecule_from_smiles, read_assembly_input
from kflow.molecular.assemble.starts import crystal_starts, lone_molecule_starts, mirror_note
from kflow.molecular.data.molecules import PACKING_COEFFICIENT, estimate_volume_per_molecule
from kflow.molecular.evaluation.contacts import CONTACT_FACTOR, HBOND_CONTACT_FACTOR, contact_scores, rank_samples

__all__ = ["AssemblyInput", "AssemblyModel", "AssemblyResult", "InputError", "assemble", "read_assembly_input",
           "molecule_from_smiles", "check_input", "mirror_note", "estimate_volume_per_molecule",
           "lone_molecule_starts", "crystal_starts", "predict_clusters", "contact_scores", "rank_samples",
           "truth_metrics", "write_assembly_outputs", "plot_clusters", "clear_model_cache", "OUTPUT_FILES",
           "DEFAULT_SAMPLES", "DEFAULT_MODEL", "PACKING_COEFFICIENT", "CONTACT_FACTOR", "HBOND_CONTACT_FACTOR",
           "RIGID_TOLERANCE"]
