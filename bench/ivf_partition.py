"""Does a finer IVF partition let a compressed-index query scan less? List recall vs share of the database scanned.

    nice .venv/bin/python bench/ivf_partition.py --work /tmp/idxscale/run --size 4M

Runs on a size that ``bench/index_scale.py`` measured (its database, ground truth, report and preset index
in ``--work``). No codes are built: for the preset's own coarse centroids and for finer partitions (two-level
k-means on a sample: 64 x 128 and 128 x 128 lists), it assigns a 200k sample of the database (list sizes)
and every exact top-100 neighbour of the 300 queries (their lists), ranks each query's lists as FAISS's
IVF does (inner product with the centroids, in the preset's PCA space), and prints, per nprobe, the share of
the exact top-100 (and top-1) lying in the probed lists, and the share of the database those lists hold,
i.e. the share of the codes a query must scan. A candidate search cannot find what its probed lists miss,
so this bounds recall for any code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_scale import Synth, parse_size  # noqa: E402

from engine.retrieval import faiss_index as fi  # noqa: E402
from engine.retrieval.faiss_runtime import faiss  # noqa: E402  (as the engine imports it)

SHARES = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8)


def assign(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each row's list, as an IVF with an inner-product quantizer assigns it (largest inner product)."""
    ix = faiss.IndexFlatIP(centroids.shape[1])
    ix.add(centroids)
    return ix.search(x, 1)[1][:, 0]


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1], k, niter=20, seed=seed, max_points_per_centroid=1 << 30, min_points_per_centroid=1
    )
    km.train(x)
    return km.centroids


def two_level(x: np.ndarray, top: int, sub: int) -> np.ndarray:
    """top x sub lists: k-means into ``top``, then each part into lists in proportion to its size."""
    a = assign(kmeans(x, top, seed=0), x)
    parts = []
    for c in range(top):
        xc = x[a == c]
        m = min(len(xc), max(1, round(top * sub * len(xc) / len(x))))
        if m:
            parts.append(kmeans(xc, m, seed=c + 1) if m > 1 else xc.mean(0, keepdims=True))
    return np.concatenate(parts).astype(np.float32)


def report(
    name: str, centroids: np.ndarray, sample: np.ndarray, truth_x: np.ndarray, truth_ids, truth, qp
) -> None:
    sizes = np.bincount(assign(centroids, sample), minlength=len(centroids)) / len(sample)
    list_of = dict(zip(truth_ids.tolist(), assign(centroids, truth_x).tolist(), strict=True))
    ix = faiss.IndexFlatIP(centroids.shape[1])
    ix.add(centroids)
    _, order = ix.search(qp, len(centroids))
    in_list = np.vectorize(list_of.get)(truth)  # (nq, 100): the list of each exact neighbour
    for share in SHARES:
        p = max(1, round(len(centroids) * share))
        hit = np.array([np.isin(in_list[i], order[i, :p]) for i in range(len(qp))])
        scanned = np.mean([sizes[order[i, :p]].sum() for i in range(len(qp))])
        print(
            f"{name:>9} nprobe {p:>6}: top-100 in probed lists {hit.mean():.4f}, top-1 {hit[:, 0].mean():.4f}, "
            f"database scanned {scanned:.3f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/index_scale", help="bench/index_scale.py's --work folder")
    ap.add_argument("--size", default="4M")
    ap.add_argument("--sample", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0, help="index_scale.py's --seed")
    args = ap.parse_args(argv)
    n = parse_size(args.size)
    work = Path(args.work)
    folder = work / f"n{n}"
    params = json.loads((work / "report.json").read_text())["params"]
    q, _ = Synth(2048, dict(params, n_tiles=n // 4), seed=args.seed).queries(300, seed=args.seed + 1)
    truth = np.load(folder / "truth.npz")["truth"]
    index = fi.read_index(folder / "index.faiss")
    pre = faiss.downcast_index(index.base)
    pca = faiss.downcast_VectorTransform(pre.chain.at(0))
    ivf = faiss.extract_index_ivf(index.base)
    db = np.load(folder / "db.npy", mmap_mode="r")
    t = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(n, min(n, args.sample), replace=False))
    sample = pca.apply(np.asarray(db[rows], dtype=np.float32))
    truth_ids = np.unique(truth)
    truth_x = pca.apply(np.asarray(db[truth_ids], dtype=np.float32))
    qp = pca.apply(q)
    print(
        f"{n:,} x {db.shape[1]}, PCA to {pca.d_out}; sample and neighbours read in {time.perf_counter() - t:.0f}s"
    )
    own = faiss.rev_swig_ptr(faiss.downcast_index(ivf.quantizer).get_xb(), ivf.nlist * ivf.d)
    report(f"IVF{ivf.nlist}", own.reshape(ivf.nlist, ivf.d).copy(), sample, truth_x, truth_ids, truth, qp)
    for top, sub in ((64, 128), (128, 128)):
        t = time.perf_counter()
        centroids = two_level(sample, top, sub)
        print(f"two-level k-means {top} x {sub}: {len(centroids)} lists in {time.perf_counter() - t:.0f}s")
        report(f"IVF{len(centroids)}", centroids, sample, truth_x, truth_ids, truth, qp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
