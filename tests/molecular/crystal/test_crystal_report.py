"""The crystal study's report: success@k counts a crystal once its k best include 8 (12, 15) matched, and the
landscape check names what failed from the minimised experimental crystal and the search's energies."""
import json

import pytest

from benchmarks.crystal_report import landscape_table, row_summary


def _result(matched, energies=None):
    energies = energies or [-30.0 + i for i in range(len(matched))]
    return {"ranked": [{"rank": i + 1, "n_matched": m, "energy": e, "pm_center_matched": 1.0 + i}
                       for i, (m, e) in enumerate(zip(matched, energies))],
            "coarse_seconds": 8.0, "refine_seconds": 2.0, "wall_seconds": 3.0}


def test_success_at_k_counts_the_k_best_only():
    results = {"A": _result([1, 9, 2]), "B": _result([15] + [1] * 9), "C": _result([3] * 10 + [12])}
    s = row_summary(results, ["A", "B", "C", "D"])  # D not finished: left out, and said so
    assert s["crystals"] == 3
    assert s["success@1_8"] == pytest.approx(1 / 3) and s["success@5_8"] == pytest.approx(2 / 3)
    assert s["success@10_12"] == pytest.approx(1 / 3) and s["success@10_15"] == pytest.approx(1 / 3)
    assert s["best_matched_top10"] == pytest.approx((9 + 15 + 3) / 3)  # C's 12 is 11th: not in the top 10
    assert s["pm_center_rank1"] == pytest.approx(1.0)
    assert s["seconds_per_molecule"] == pytest.approx(10.0)  # the budget's whole cost, not the last run's wall time


def test_landscape_verdicts(tmp_path):
    crystals = []
    cases = {  # name: (self-match, volume change, minimised energy, search energies, best matched)
        "FOUND": (15, 0.05, -30.0, [-31.0, -29.0], [9, 1]),
        "FF": (6, 0.05, -30.0, [-31.0], [1]),
        "SEARCH": (15, 0.04, -35.0, [-31.0, -30.0], [2, 1]),
        "RANK": (15, 0.04, -30.0, [-33.0, -31.0], [2, 1]),
    }
    for name, (self_match, volume, energy, energies, matched) in cases.items():
        crystals.append({"name": name, "space_group": "P2_1/c", "atoms": 20})
        (tmp_path / "landscape" / name).mkdir(parents=True)
        (tmp_path / "landscape" / name / "result.json").write_text(json.dumps(
            {"energy_before": 0.0, "energy": energy, "volume_change": volume, "self_n_matched": self_match}))
        (tmp_path / "energy_100" / name).mkdir(parents=True)
        (tmp_path / "energy_100" / name / "result.json").write_text(json.dumps(_result(matched, energies)))
    _, verdicts = landscape_table(tmp_path, crystals, "energy_100")
    assert verdicts == {"FOUND": "found", "FF": "force field", "SEARCH": "search", "RANK": "ranking"}
