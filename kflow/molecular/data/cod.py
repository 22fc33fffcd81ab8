"""COD-Cluster17: the raw CSV pairs and AssembleFlow's 5K/10K id lists from the Hugging Face hub, and their
preprocessing (in worker processes) into a cluster store.
"""
from __future__ import annotations

import hashlib
import json
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence


from kflow.molecular.data.cluster import InvalidCrystal, RejectionSummary
from kflow.molecular.data.sources import BUILDER_VERSION, one_thread_worker
from kflow.molecular.data.store import serialize_cluster, write_cluster_store


__all__ = ["cod_cluster17_ids", "preprocess_cod_cluster17", "cod_subset_lists", "cod_store_key", "COD_HUB_DATASET",
           "COD_HUB_PATTERNS", "COD_SUBSETS"]


COD_HUB_DATASET = "chao1224/CrystalFlow"
# What kflow reads of the hub dataset: the raw CSV pairs and AssembleFlow's 5K/10K id lists (not its processed
# tensors). fnmatch patterns: "*" also matches "/", so the raw folder may sit at any depth under COD/.
COD_HUB_PATTERNS = ["COD/*raw/FinalPositions/*", "COD/*raw/InitialPositions/*", "COD/*processed_5000/valid_idx.txt",
                    "COD/*processed_10000/valid_idx.txt"]
# The 5K/10K id lists: kflow's own names (raw/subset_5k.txt, subset_5k.txt) and AssembleFlow's layout
# (processed_5000/valid_idx.txt beside raw/).
COD_SUBSETS = {"5k": ("subset_5k.txt", "processed_5000"), "10k": ("subset_10k.txt", "processed_10000")}


# -------------------------------------------------------------------------------------------- COD-Cluster17
def cod_subset_lists(root: Path, subset: str) -> list[Path]:
    """Where the id list of COD-Cluster17 subset "5k"/"10k" may be, in the order searched: kflow's names
    (``raw/subset_5k.txt``, ``subset_5k.txt``) and AssembleFlow's layout (``processed_5000/valid_idx.txt``)."""
    own, assembleflow = COD_SUBSETS[subset]
    return [root / "raw" / own, root / own, root / assembleflow / "valid_idx.txt"]


def _subsets_help(root: Path) -> str:
    return (f"The 5K/10K id lists come with AssembleFlow's COD-Cluster17 data (hub dataset '{COD_HUB_DATASET}', "
            f"files COD/processed_5000/valid_idx.txt and COD/processed_10000/valid_idx.txt, fetched with the raw "
            f"CSVs when online); a COD/ folder in AssembleFlow's layout works as it is. Otherwise put a list at "
            f"{root}/processed_5000/valid_idx.txt or {root}/raw/subset_5k.txt (10k likewise), one cluster id per "
            "line, or use subset 'all' or the path of an id list.")


def cod_cluster17_ids(root: Path, subset: str, download: bool = True) -> list[str]:
    """Cluster ids of a COD-Cluster17 subset under ``root`` (the folder holding ``raw/``): "all", "5k"/"10k"
    (``cod_subset_lists``) or the path of an id list (one id per line). Missing raw data or lists are fetched
    from the hub when ``download`` (only what kflow reads: ``COD_HUB_PATTERNS``)."""
    root = Path(root)
    raw = root / "raw"
    final_dir = raw / "FinalPositions"
    if not final_dir.is_dir() and download:
        _download_cod(root)
    if not final_dir.is_dir():  # say where the data lives, which files go where and how to check: no more
        raise FileNotFoundError(
            f"COD-Cluster17 data not found in {root}: get the folder COD/ of the hub dataset '{COD_HUB_DATASET}' "
            f"and put its raw/FinalPositions/<id>_cluster16.csv and raw/InitialPositions/<id>_cluster16_noised.csv "
            f"under {root}/, with its id lists processed_5000/valid_idx.txt and processed_10000/valid_idx.txt beside "
            f"raw/; then check the layout with: python -c \"from kflow.molecular.data.cod import cod_cluster17_ids "
            f"as ids; print(len(ids({str(root)!r}, {subset!r}, download=False)), 'clusters')\"")
    if subset == "all":
        return sorted(p.name[: -len("_cluster16.csv")] for p in final_dir.glob("*_cluster16.csv"))
    if subset in COD_SUBSETS:
        candidates = cod_subset_lists(root, subset)
        list_path = next((p for p in candidates if p.is_file()), None)
        if list_path is None and download:
            _download_cod(root)
            list_path = next((p for p in candidates if p.is_file()), None)
        if list_path is None:
            raise FileNotFoundError(f"COD-Cluster17 subset {subset}: no id list at "
                                    f"{', '.join(str(p) for p in candidates)}. " + _subsets_help(root))
    else:
        list_path = Path(subset)
        if not list_path.is_file():
            raise FileNotFoundError(f"subset id list {list_path} not found: put the cluster ids there, one per line "
                                    f"(or use subset '5k', '10k' or 'all'). " + _subsets_help(root))
    # one id per line; a trailing file suffix or a CSV-style "id,..." line is tolerated
    ids = [ln.split(",")[0].strip() for ln in list_path.read_text().splitlines() if ln.strip()]
    return [i.removesuffix("_cluster16.csv").removesuffix("_cluster16") for i in ids]


def _download_cod(root: Path):
    """Fetch what kflow reads of the hub folder ``COD/`` (``COD_HUB_PATTERNS``: raw CSVs and the 5K/10K id lists)
    into ``root/hub``, then move the folder that holds ``FinalPositions/`` (its depth in the hub layout is not
    assumed) to ``root/raw`` and AssembleFlow's id lists to ``root/processed_*/valid_idx.txt``. Nothing is moved
    unless the download completed. Failures (offline, no huggingface_hub) are reported and left to the caller,
    which raises with instructions."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(COD_HUB_DATASET, repo_type="dataset", allow_patterns=COD_HUB_PATTERNS,
                          local_dir=str(root / "hub"))
    except Exception as err:
        why = "huggingface_hub is not installed" if isinstance(err, ImportError) else "no network, or no answer"
        print(f"COD-Cluster17: nothing downloaded from the hub dataset {COD_HUB_DATASET} ({why})")
        return
    found = sorted((root / "hub").rglob("FinalPositions"), key=lambda p: len(p.parts))
    if not found:
        return
    hub_raw = found[0].parent
    raw = root / "raw"
    if not raw.exists():
        os.replace(hub_raw, raw)
    for _, folder in COD_SUBSETS.values():
        listed, target = hub_raw.parent / folder / "valid_idx.txt", root / folder / "valid_idx.txt"
        if listed.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(listed, target)


def cod_store_key(root: Path, ids: Sequence[str], rigid_tolerance: float) -> str:
    """Key of a preprocessed COD-Cluster17 store: the ids, the size and modification time of each CSV pair (a
    changed, added or removed file changes it), the rigidity tolerance and the store format."""
    from kflow.molecular.data.io import cod_cluster17_paths

    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps([BUILDER_VERSION, rigid_tolerance]).encode())
    for cid in ids:
        digest.update(cid.encode("utf-8", "surrogateescape") + b"\0")
        for f in cod_cluster17_paths(root, cid):
            try:
                st = f.stat()
                digest.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                digest.update(b"missing;")
    return digest.hexdigest()


def _preprocess_cod_chunk(args):
    """Worker: parse, validate and rigidity-check a chunk of CSV pairs (one batched SVD for the whole chunk) and
    encode the kept ones (``encode_record``, no pickle), so the main process only writes bytes. Returns
    ([SerializedCluster], [(reason, msg)])."""
    from kflow.molecular.data.io import cod_cluster17_paths, read_cod_cluster17_record, record_residuals

    root, ids, tolerance = args
    records, rejected = [], []
    for cid in ids:
        initial, final = cod_cluster17_paths(root, cid)
        try:
            records.append(read_cod_cluster17_record(initial, final, name=cid))
        except InvalidCrystal as err:
            rejected.append((err.reason, str(err)))
        except Exception as err:  # one bad file never stops a build of thousands
            rejected.append(("error", f"{cid}: {type(err).__name__}: {err}"))
    kept = []
    for record, residual in zip(records, record_residuals(records)):
        if residual.max() > tolerance:
            m = int(residual.argmax())
            rejected.append(("not_rigid", f"cluster {record['name']!r}, molecule {m}: initial and final atoms differ "
                                          f"by more than a rigid motion (RMS residual {residual[m]:.3g} Å)"))
        else:
            kept.append(serialize_cluster(record))
    return kept, rejected


def preprocess_cod_cluster17(root: Path, ids: Sequence[str], store_path: Path, num_workers: int | None = None,
                             progress: bool = True, rigid_tolerance: float = 1e-3,
                             chunk_size: int = 64) -> RejectionSummary:
    """Parse raw CSV pairs in worker processes (chunks of ``chunk_size`` clusters, rigidity checked per chunk in
    one batched SVD), write the LMDB store transactionally; returns the kept/rejected summary by reason. The store's
    metadata holds the summary and ``cod_store_key`` (so a changed raw folder or id list is noticed)."""
    root, ids = Path(root), list(ids)
    summary = RejectionSummary()
    num_workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    chunks = [(root, ids[k:k + chunk_size], rigid_tolerance) for k in range(0, len(ids), chunk_size)]
    meta = {"source": "COD-Cluster17", "root": str(root), "rigid_tolerance": rigid_tolerance,
            "build_key": cod_store_key(root, ids, rigid_tolerance)}

    def clusters():
        if num_workers > 1 and len(chunks) > 1:
            pool = get_context("fork").Pool(min(num_workers, len(chunks)), initializer=one_thread_worker)
            results = pool.imap(_preprocess_cod_chunk, chunks)
        else:
            pool, results = None, map(_preprocess_cod_chunk, chunks)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="preprocessing COD-Cluster17", unit="cluster")
        try:
            for kept, rejected in results:
                for reason, message in rejected:
                    summary.reject(reason, message)
                summary.keep(len(kept))
                if bar is not None:
                    bar.update(len(kept) + len(rejected))
                yield from kept
            meta["summary"] = summary.as_dict()  # read by write_cluster_store after the last cluster
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    write_cluster_store(clusters(), store_path, meta=meta)
    if os.environ.get("RANK", "0") == "0":
        print(f"COD-Cluster17 preprocessing: {summary}", flush=True)
    return summary
