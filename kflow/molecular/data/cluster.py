"""The ``Cluster`` sample: M rigid copies of one molecule in an initial (noised) and a final (crystal) arrangement."""
from __future__ import annotations

import json

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch_geometric.data import Data

__all__ = ["Cluster", "ClusterData", "InvalidCrystal", "InvalidCluster", "RejectionSummary", "NUM_MOLECULES"]

NUM_MOLECULES = 17  # central molecule + 16 nearest neighbours (COD-Cluster17)


class InvalidCrystal(ValueError):
    """A crystal cannot give a COD-Cluster17-style cluster; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class InvalidCluster(InvalidCrystal):
    """A cluster (e.g. read from CSV) is malformed or inconsistent."""


@dataclass
class Cluster:
    """One assembly sample.

    Attributes:
        atomic_numbers: [N] long.
        molecule_index: [N] long, 0..M-1; molecule 0 is the central one. Atoms of a molecule are contiguous.
        initial_positions: [N, 3] float, Å (the noised, weakly correlated arrangement).
        final_positions: [N, 3] float, Å (the crystal arrangement).
        name: sample id (e.g. COD id or "REFCODE_draw3").
        crystal: the crystal it comes from (refcode or COD id); splits never separate clusters of one crystal.
    """

    atomic_numbers: torch.Tensor
    molecule_index: torch.Tensor
    initial_positions: torch.Tensor
    final_positions: torch.Tensor
    name: str = ""
    crystal: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.atomic_numbers = torch.as_tensor(self.atomic_numbers, dtype=torch.long)
        self.molecule_index = torch.as_tensor(self.molecule_index, dtype=torch.long)
        self.initial_positions = torch.as_tensor(self.initial_positions, dtype=torch.float32)
        self.final_positions = torch.as_tensor(self.final_positions, dtype=torch.float32)
        if not self.crystal:
            self.crystal = self.name

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.numel())

    @property
    def num_molecules(self) -> int:
        return int(self.molecule_index.max()) + 1 if self.num_atoms else 0

    def validate(self, num_molecules: int | None = NUM_MOLECULES) -> "Cluster":
        """Check shapes, finiteness, molecule count and equal molecule sizes; raise ``InvalidCluster``."""
        n = self.num_atoms
        where = f"cluster {self.name!r}"
        if n == 0:
            raise InvalidCluster("empty", f"{where} has no atoms")
        for key in ("molecule_index", "initial_positions", "final_positions"):
            v = getattr(self, key)
            if v.shape[0] != n or (key.endswith("positions") and v.shape != (n, 3)):
                raise InvalidCluster("shape_mismatch", f"{where}: {key} has shape {tuple(v.shape)} for {n} atoms")
        for key in ("initial_positions", "final_positions"):
            if not torch.isfinite(getattr(self, key)).all():
                raise InvalidCluster("nan", f"{where}: {key} contains NaN or inf")
        if (self.atomic_numbers < 1).any() or (self.atomic_numbers > 118).any():
            raise InvalidCluster("unknown_element", f"{where}: atomic numbers outside 1..118")
        counts = torch.bincount(self.molecule_index)
        if num_molecules is not None and counts.numel() != num_molecules:
            raise InvalidCluster("molecule_count", f"{where} has {counts.numel()} molecules, expected {num_molecules}")
        if (counts == 0).any():
            raise InvalidCluster("molecule_count", f"{where}: molecule ids are not contiguous 0..M-1")
        if (counts != counts[0]).any():
            raise InvalidCluster("atom_count_mismatch", f"{where}: molecules have different atom counts "
                                 f"{counts.tolist()}")
        order = torch.argsort(self.molecule_index, stable=True)
        z = self.atomic_numbers[order].view(counts.numel(), -1)  # [M, P]: copies of one molecule, same atom order
        if (z != z[0]).any():
            m = int((z != z[0]).any(1).nonzero()[0])
            raise InvalidCluster("composition_mismatch", f"{where}: molecule {m} lists different elements (or a "
                                 f"different atom order) than molecule 0")
        return self

    def to_data(self):
        """A ``torch_geometric.data.Data`` with the fields of docs/CONTRACTS.md."""
        return ClusterData(atomic_numbers=self.atomic_numbers, molecule_index=self.molecule_index,
                    initial_positions=self.initial_positions, final_positions=self.final_positions,
                    num_molecules=self.num_molecules, name=self.name, crystal=self.crystal,
                    num_nodes=self.num_atoms)

    def to_numpy(self) -> dict:
        """Compact serialisable form (float32 positions, uint8 elements; ``info`` as a JSON string)."""
        record = {"atomic_numbers": self.atomic_numbers.numpy().astype(np.uint8),
                  "molecule_index": self.molecule_index.numpy().astype(np.uint8),
                  "initial_positions": self.initial_positions.numpy().astype(np.float32),
                  "final_positions": self.final_positions.numpy().astype(np.float32),
                  "name": self.name, "crystal": self.crystal}
        if self.info:
            record["info"] = json.dumps(self.info, sort_keys=True)
        return record

    @classmethod
    def from_numpy(cls, d: dict) -> "Cluster":
        info = d.get("info")
        return cls(torch.from_numpy(d["atomic_numbers"].astype(np.int64)),
                   torch.from_numpy(d["molecule_index"].astype(np.int64)),
                   torch.from_numpy(d["initial_positions"]), torch.from_numpy(d["final_positions"]),
                   d["name"], d["crystal"], json.loads(info) if isinstance(info, str) else {})


class ClusterData(Data):
    """PyG Data of one cluster. ``molecule_index`` is per cluster (0..M-1), so batching must not offset it (PyG
    offsets every attribute whose name contains "index" by default)."""

    def __inc__(self, key, value, *args, **kwargs):
        if key == "molecule_index":
            return 0
        return super().__inc__(key, value, *args, **kwargs)


class RejectionSummary:
    """Counts kept and rejected items by reason; keeps a few examples of each reason.

    With ``source`` (the input file an item came from), it also keeps one record per input file, so a build can
    show that every file ended in exactly one of: crystal(s) built (``built``), every crystal rejected with a named
    reason (``rejected``), or an error naming the file and the cause (``error``: reasons in ``ERROR_REASONS``).
    ``reader`` (e.g. "ase" or "pymatgen") counts which reader produced the kept crystals of each file.
    ``renamed`` maps a cluster name to the file name it was written under where the two differ (characters a file
    name cannot hold, or a suffix because another name became the same file name).
    """

    ERROR_REASONS = frozenset({"unreadable", "error"})

    def __init__(self):
        self.kept = 0
        self.rejected: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.files: dict[str, dict] = {}
        self.readers: Counter = Counter()
        self.renamed: dict[str, str] = {}

    def rename(self, name: str, file_id: str):
        """Record that ``name`` was written under the file name ``file_id``."""
        self.renamed[str(name)] = str(file_id)

    def note_file(self, source: str) -> dict:
        """The record of input file ``source`` (created empty, so a file that yields nothing still shows)."""
        return self.files.setdefault(str(source), {"kept": 0, "rejected": Counter(), "readers": Counter(),
                                                   "messages": []})

    def keep(self, n: int = 1, source: str | None = None, reader: str | None = None):
        self.kept += n
        if reader is not None:
            self.readers[reader] += n
        if source is not None:
            record = self.note_file(source)
            record["kept"] += n
            if reader is not None:
                record["readers"][reader] += n

    def reject(self, reason: str, message: str, source: str | None = None):
        self.rejected[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(message)
        if source is not None:
            record = self.note_file(source)
            record["rejected"][reason] += 1
            if len(record["messages"]) < 3:
                record["messages"].append(message)

    def file_status(self, source: str) -> str:
        """"built", "rejected" or "error" (see the class docstring)."""
        record = self.files[str(source)]
        if record["kept"]:
            return "built"
        if any(reason not in self.ERROR_REASONS for reason in record["rejected"]):
            return "rejected"
        return "error"

    def merge(self, other: "RejectionSummary"):
        self.kept += other.kept
        self.rejected.update(other.rejected)
        self.readers.update(other.readers)
        self.renamed.update(other.renamed)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: 3 - len(self.examples[k])])
        for source, theirs in other.files.items():
            record = self.note_file(source)
            record["kept"] += theirs["kept"]
            record["rejected"].update(theirs["rejected"])
            record["readers"].update(theirs["readers"])
            record["messages"].extend(theirs["messages"][: 3 - len(record["messages"])])

    def as_dict(self) -> dict:
        out = {"kept": self.kept, "rejected": dict(self.rejected), "examples": self.examples}
        if self.readers:
            out["readers"] = dict(self.readers)
        if self.renamed:
            out["renamed"] = dict(self.renamed)
        if self.files:
            files = {}
            for source, record in self.files.items():
                files[source] = {"status": self.file_status(source), "kept": record["kept"],
                                 "rejected": dict(record["rejected"])}
                if record["readers"]:
                    files[source]["readers"] = dict(record["readers"])
                if record["messages"]:
                    files[source]["messages"] = list(record["messages"])
            out["file_status"] = dict(Counter(f["status"] for f in files.values()))
            out["files"] = files
        return out

    def __str__(self):
        lines = [f"kept {self.kept}, rejected {sum(self.rejected.values())}"]
        lines += [f"  {reason}: {n}  (e.g. {self.examples[reason][0]})" for reason, n in self.rejected.most_common()]
        if self.files:
            status = Counter(self.file_status(s) for s in self.files)
            lines.append(f"input files: {len(self.files)} ({status['built']} built, {status['rejected']} rejected, "
                         f"{status['error']} errors)")
        if self.readers:
            lines.append("readers of the kept crystals: " + ", ".join(f"{k} {v}" for k, v in
                                                                        self.readers.most_common()))
        if self.renamed:
            lines.append(f"{len(self.renamed)} cluster(s) written under another file name (characters a file name "
                         "cannot hold, or a name that became another's): listed under 'renamed' in summary.json")
        return "\n".join(lines)
