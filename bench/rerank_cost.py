"""What the exact re-ranking of a compressed index costs, and what it does to the candidate scan that follows.

    .venv/bin/python bench/rerank_cost.py --index /tmp/idxscale/run/n4000000/index.faiss \\
        --bench-work /tmp/idxscale/run --single 40

Runs on an index written by ``write_index`` for a ``+rerank`` factory (the ``compressed`` preset; the float16
vector file beside it), e.g. one that ``bench/index_scale.py`` built. Two ways of scoring the candidates, side
by side on the same queries, interleaved query by query (so that both see the same machine state):

- ``faiss``: the engine's scorer: float16 rows widened by FAISS's fp16 ScalarQuantizer, dot products by
  ``fvec_inner_products_ny`` on the calling thread;
- ``numpy``: what the engine did before: ``astype(float32)`` and a numpy matmul (OpenBLAS, multi-threaded).

Each scorer serves its own stream of queries (the streams alternate, twice, after a warm-up round): a
scorer's threads can slow the scan of the query after it. Printed, as medians: the whole single-query
search (``search(index, q, 100)``), the scoring of 1000 candidates alone, and the candidate scan of the next
query right after it. Both must return the same neighbours (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.retrieval import faiss_index as fi  # noqa: E402

FAISS_SCORES = fi._exact_scores


def numpy_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The engine's scorer before this bench: numpy widening and an OpenBLAS matmul per block."""
    fi._prefetch(vectors, rows)
    out = np.empty(rows.size, dtype=np.float32)
    for start in range(0, rows.size, fi._RERANK_BLOCK):
        part = rows[start : start + fi._RERANK_BLOCK]
        out[start : start + part.size] = np.asarray(vectors[part], dtype=np.float32) @ query
    return out


SCORERS = {"faiss": FAISS_SCORES, "numpy": numpy_scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a compressed (+rerank) index file")
    ap.add_argument("--queries-npy", default=None, help="float32 queries (nq x d); default: noisy rows")
    ap.add_argument(
        "--bench-work",
        default=None,
        help="the --work folder of bench/index_scale.py: its queries for this size",
    )
    ap.add_argument("--single", type=int, default=40, help="single queries timed (after a warm-up pass)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    index = fi.read_index(args.index)
    if not isinstance(index, fi.RerankIndex):
        raise SystemExit(f"{args.index} has no float16 vector file beside it: not a +rerank index")
    if args.bench_work:  # the photo-like queries index_scale.py measured this database with (its seed 0)
        sys.path.insert(0, str(ROOT / "bench"))
        from index_scale import Synth

        params = json.loads(Path(args.bench_work, "report.json").read_text())["params"]
        synth = Synth(index.d, dict(params, n_tiles=index.ntotal // 4), seed=0)
        q = synth.queries(300, seed=1)[0][: args.single].astype(np.float32)
    elif args.queries_npy:
        q = np.load(args.queries_npy).astype(np.float32)[: args.single]
    else:
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(index.ntotal, args.single, replace=False))
        q = np.asarray(index.vectors[rows], dtype=np.float32)
        q += rng.standard_normal(q.shape).astype(np.float32) * 0.5 / np.sqrt(q.shape[1])
    faiss.normalize_L2(q)
    print(f"{index!r}; {len(q)} queries, k={args.k}, {args.threads} FAISS threads", flush=True)

    n_cand = max(args.k, index.rerank)
    _, cand = fi.search(index.base, q, n_cand)  # the candidates each query re-ranks (for the scorer timing)
    cand = [np.unique(c[c >= 0]) for c in cand]
    times: dict[str, dict[str, list[float]]] = {
        name: {"search": [], "scan": [], "score": []} for name in SCORERS
    }
    results: dict[str, list[np.ndarray]] = {name: [] for name in SCORERS}
    # streams of queries, one scorer per stream (a scorer's threads affect the next query's scan), the two
    # scorers' streams alternating; the first round warms up (reads the candidate rows into the page cache)
    for rnd in range(3):
        for name, scorer in SCORERS.items():
            fi._exact_scores = scorer
            for i in range(len(q)):
                t0 = time.perf_counter()
                _, ids = fi.search(index, q[i], args.k)
                t1 = time.perf_counter()
                if rnd:
                    times[name]["search"].append(t1 - t0)
                    results[name].append(ids[0])
            for i in range(len(q)):  # the parts: scoring 1000 candidates, then the next query's scan
                t0 = time.perf_counter()
                scorer(index.vectors, cand[i], q[i])
                t1 = time.perf_counter()
                fi.search(index.base, q[(i + 1) % len(q)], n_cand)
                t2 = time.perf_counter()
                if rnd:
                    times[name]["score"].append(t1 - t0)
                    times[name]["scan"].append(t2 - t1)
    fi._exact_scores = FAISS_SCORES
    same = all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(*results.values(), strict=True))
    # (sets, not orders: the two float32 sums may order exact ties differently)
    med = {n: {part: statistics.median(v) * 1e3 for part, v in t.items()} for n, t in times.items()}
    print(f"{'scorer':<8}{'search ms':>11}{'scan after ms':>15}{f'score {n_cand} ms':>16}")
    for name, m in med.items():
        print(f"{name:<8}{m['search']:>11.1f}{m['scan']:>15.1f}{m['score']:>16.1f}")
    print(
        f"numpy / faiss: search {med['numpy']['search'] / med['faiss']['search']:.2f}x, scan "
        f"{med['numpy']['scan'] / med['faiss']['scan']:.2f}x, score {med['numpy']['score'] / med['faiss']['score']:.2f}x"
    )
    print(f"same {args.k} neighbours for every query: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
