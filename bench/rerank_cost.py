"""What the exact re-ranking of a compressed index costs, and what it does to the candidate scan that follows.

    .venv/bin/python bench/rerank_cost.py --index /tmp/idx/n1000000/index.faiss --bench-work /tmp/idx \\
        --single 30

Runs on an index written by ``write_index`` for a ``+rerank`` factory (the ``compressed`` preset; the float16
vector file beside it), e.g. one that ``bench/index_scale.py`` built. Three ways of scoring the candidates,
side by side on the same queries, interleaved query by query (so that all see the same machine state):

- ``engine``: the engine's scorer (``faiss_index._exact_scores``): blocks of rows gathered and widened by
  torch, dot products by FAISS's ``fvec_inner_products_ny``, the rows split over FAISS's thread count
  (session 28); the page prefetch skipped when a sample of the rows is in the page cache;
- ``one_thread``: the same on the calling thread alone (the engine's scorer of session 27);
- ``sq_decode``: the engine's scorer until session 27: rows gathered by numpy from the memmap, widened by
  FAISS's fp16 ScalarQuantizer, the same dot products; every query prefetched;
- ``numpy``: the engine's scorer until session 24: ``astype(float32)`` and a numpy matmul (OpenBLAS,
  multi-threaded).

Each scorer serves its own stream of queries (the streams alternate, twice, after a warm-up round): a
scorer's threads can slow the scan of the query after it. Printed, as medians: the whole single-query
search (``search(index, q, 100)``), the scoring of the candidates alone, and the candidate scan of the next
query right after it. On the same candidates, the scorers must agree (checked: see the end of main).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.retrieval import faiss_index as fi  # noqa: E402
from engine.retrieval.faiss_runtime import faiss  # noqa: E402  (as the engine imports it)

ENGINE_SCORES = fi._exact_scores
_OLD_BLOCK = 1024  # rows a block in the scorers before session 27


def sq_decode_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The engine's scorer of sessions 24-26: numpy gathers from the memmap, FAISS's fp16 decoder widens."""
    fi._prefetch(vectors, rows, skip_resident=False)
    d = vectors.shape[1]
    q = np.ascontiguousarray(query, dtype=np.float32).ravel()
    out = np.empty(rows.size, dtype=np.float32)
    half = vectors.dtype == np.float16
    widen = faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16) if half else None
    for start in range(0, rows.size, _OLD_BLOCK):
        part = rows[start : start + _OLD_BLOCK]
        if half:
            block = widen.decode(np.ascontiguousarray(vectors[part]).view(np.uint8))
        else:
            block = np.ascontiguousarray(vectors[part], dtype=np.float32)
        res = out[start : start + part.size]
        faiss.fvec_inner_products_ny(
            faiss.swig_ptr(res), faiss.swig_ptr(q), faiss.swig_ptr(block), d, part.size
        )
    return out


def numpy_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The engine's scorer before session 24: numpy widening and an OpenBLAS matmul per block."""
    fi._prefetch(vectors, rows, skip_resident=False)
    out = np.empty(rows.size, dtype=np.float32)
    for start in range(0, rows.size, _OLD_BLOCK):
        part = rows[start : start + _OLD_BLOCK]
        out[start : start + part.size] = np.asarray(vectors[part], dtype=np.float32) @ query
    return out


def one_thread_scores(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The engine's scorer on the calling thread alone (session 27's)."""
    return ENGINE_SCORES(vectors, rows, query, threads=1)


SCORERS = {
    "engine": ENGINE_SCORES,
    "one_thread": one_thread_scores,
    "sq_decode": sq_decode_scores,
    "numpy": numpy_scores,
}
EXACT = ("one_thread", "sq_decode")  # scorers whose scores must equal the engine's bit for bit


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
    ap.add_argument("--rerank", type=int, default=None, help="candidates re-ranked (default: the index's)")
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

    if args.rerank is not None:
        index.rerank = args.rerank
    n_cand = max(args.k, index.rerank)
    _, cand = fi.search(index.base, q, n_cand)  # the candidates each query re-ranks (for the scorer timing)
    cand = [np.unique(c[c >= 0]) for c in cand]
    times: dict[str, dict[str, list[float]]] = {
        name: {"search": [], "scan": [], "score": []} for name in SCORERS
    }
    results: dict[str, list[np.ndarray]] = {name: [] for name in SCORERS}
    # streams of queries, one scorer per stream (a scorer's threads affect the next query's scan), the
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
            for i in range(len(q)):  # the parts: scoring the candidates, then the next query's scan
                t0 = time.perf_counter()
                scores = scorer(index.vectors, cand[i], q[i])
                t1 = time.perf_counter()
                fi.search(index.base, q[(i + 1) % len(q)], n_cand)
                t2 = time.perf_counter()
                if rnd:
                    times[name]["score"].append(t1 - t0)
                    times[name]["scan"].append(t2 - t1)
                if rnd == 1:
                    results[name].append(scores)
    fi._exact_scores = ENGINE_SCORES

    # on the same candidates: the one_thread and sq_decode scorers take the same float32 sums, so their scores
    # must be equal bit for bit; numpy's BLAS sums in another order, so only the top k is compared (as sets:
    # exact ties) (whole searches are not compared: the fast-scan keeps ties at its last candidate in thread
    # order)
    def top(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.sort(rows[np.argsort(-scores, kind="stable")[: args.k]])

    same = {
        name: all(np.array_equal(a, b) for a, b in zip(results["engine"], results[name], strict=True))
        for name in EXACT
    }
    same.update(
        numpy=all(
            np.array_equal(top(a, c), top(b, c))
            for a, b, c in zip(results["engine"], results["numpy"], cand, strict=True)
        )
    )
    med = {n: {part: statistics.median(v) * 1e3 for part, v in t.items()} for n, t in times.items()}
    print(f"{'scorer':<11}{'search ms':>11}{'scan after ms':>15}{f'score {n_cand} ms':>16}")
    for name, m in med.items():
        print(f"{name:<11}{m['search']:>11.1f}{m['scan']:>15.1f}{m['score']:>16.1f}")
    base = med["engine"]
    for name, m in med.items():
        if name != "engine":
            print(
                f"{name} / engine: search {m['search'] / base['search']:.2f}x, scan "
                f"{m['scan'] / base['scan']:.2f}x, score {m['score'] / base['score']:.2f}x"
            )
    for name in EXACT:
        print(f"{name}: the engine's scores, bit for bit, for every query: {same[name]}")
    print(f"numpy: the engine's {args.k} best candidates for every query: {same['numpy']}")
    return 0 if all(same[name] for name in EXACT) else 1


if __name__ == "__main__":
    raise SystemExit(main())
