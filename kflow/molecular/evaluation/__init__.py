"""Scores of predicted clusters: packing matching (``matching``), collisions and separation (``collisions``), contacts
and the ranking of samples (``contacts``), the field's packing metric from OXtalign (``oxtal``: molecules matched
of 15, COMPACK's RMSD₁₅), kflow's forced-match RMSD (``rmsd``); ``dense`` holds what the metrics share.
"""
from kflow.molecular.evaluation.collisions import collision_rate, separation_rate
from kflow.molecular.evaluation.contacts import contact_scores, rank_samples
from kflow.molecular.evaluation.matching import (PackingMatching, aggregate_min_over_repeats, compute_packing_matching,
                                                 match_molecules, permute_molecules)
from kflow.molecular.evaluation.oxtal import PackingMatch, cluster_packing_match, packing_match
from kflow.molecular.evaluation.rmsd import rmsd15

__all__ = ["PackingMatching", "compute_packing_matching", "match_molecules", "permute_molecules", "collision_rate",
           "separation_rate", "rmsd15", "aggregate_min_over_repeats", "contact_scores", "rank_samples",
           "PackingMatch", "cluster_packing_match", "packing_match"]
