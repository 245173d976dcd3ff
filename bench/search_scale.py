"""How FAISS index types trade memory, speed and recall@k for 2048-d retrieval descriptors at scale.

    .venv/bin/python bench/search_scale.py --n 50000 --json bench_out/search_scale_50k.json
    .venv/bin/python bench/search_scale.py --n 1000000 --json bench_out/search_scale_1M.json
    .venv/bin/python bench/search_scale.py --real descriptors.npy [--real-queries photos.npy]

Data (synthetic unless --real): ``--data manifold`` (default) makes descriptors as a smooth function of a
32-d scene latent (see :class:`Manifold`: decaying spectrum, local neighbours, overlapping clusters);
``--data clusters`` is a hard case where neighbours are scattered over IVF lists (see :class:`Clusters`).
Queries are near database vectors, not equal (a photo is near its tile). With --real, ``--queries`` rows are
held out of the database and used as queries unless --real-queries is given. Synthetic recall depends on the
model: the lead's --real run on AstroLoc descriptors is the measure that counts.

Ground truth is exact search (``Flat``) through ``engine.retrieval.faiss_index.search``; every other factory is built
with ``engine.retrieval.faiss_index.build`` and compared with it: train/add time, serialised bytes, ms per query in a
batch and for single queries, recall@k (the fraction of the exact top-k ids found in the approximate top-k),
at a few nprobe / efSearch settings, plus a filtered search (``--filter-frac`` of the ids allowed, as an area
filter) at the index's default setting.

Memory: the database is generated straight into the Flat index's own storage (one n x d float32 buffer,
8.2 GB at 1M x 2048) and every other index reads it through a view: no second copy. IVF factories with the
same nlist (and no pre-transform) share one trained coarse quantizer, trained once on a sample (its time is
printed once); their "train" column is the rest (PQ/SQ codebooks).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.retrieval import faiss_index as fi  # noqa: E402
from engine.retrieval.faiss_runtime import faiss  # noqa: E402  (as the engine imports it)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


# ---------------------------------------------------------------------------------------------- data


def flat_with_storage(n: int, d: int) -> tuple[faiss.Index, np.ndarray]:
    """An IndexFlatIP holding n vectors, and a writable (n, d) float32 numpy view of its storage.

    One allocation, no copy: the benchmark fills the view, exact search reads it in place, and the other
    indexes are built from it.
    """
    index = fi.make_index(d, "Flat")
    index.codes.resize(n * d * 4)
    index.ntotal = n
    view = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    return index, view


class Manifold:
    """Descriptors as a smooth function of a low-dimensional scene latent (the default data).

    z = one of ``clusters`` latent centres (terrain types) + ``spread`` x N(0, I_r); x = normalise(W2 tanh(W1 z
    + b) + noise), W1: r -> 512, W2: 512 -> d. Like real descriptors, the spectrum decays (~40 % of the
    variance in 16 directions, ~70 % in 64) and neighbours are local on a curved manifold, so k-means cells
    (IVF lists) are patches of it. spread=1.0 makes the clusters overlap (a continuum of scenes): IVF-Flat
    recall@100 at 200k is ~0.65 / 0.8 / 0.94 at 0.4 / 1.6 / 6 % of the lists probed (spread=0.7 gives 0.97+
    at any of these, a flattering case).
    """

    def __init__(
        self, d: int, clusters: int, r: int = 32, spread: float = 1.0, noise: float = 0.5, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.d, self.r, self.spread, self.noise = d, r, spread, noise
        self.centres = rng.standard_normal((clusters, r), dtype=np.float32)
        self.w1 = rng.standard_normal((r, 512), dtype=np.float32) * np.float32(1.5 / math.sqrt(r))
        self.b1 = rng.uniform(-1, 1, 512).astype(np.float32)
        self.w2 = rng.standard_normal((512, d), dtype=np.float32) * np.float32(1 / math.sqrt(512))
        self.rng = rng
        self.scale = None

    def embed(self, z: np.ndarray, out: np.ndarray, noise: float) -> None:
        out[:] = np.tanh(z @ self.w1 + self.b1) @ self.w2
        if self.scale is None:  # noise relative to the typical signal norm, fixed on the first chunk
            self.scale = float(np.sqrt((out**2).sum(1).mean()))
        out += self.rng.standard_normal(out.shape, dtype=np.float32) * np.float32(
            noise * self.scale / math.sqrt(self.d)
        )
        faiss.normalize_L2(out)

    def fill(self, x: np.ndarray, chunk: int = 32768) -> None:
        n = len(x)
        self.z = np.empty((n, self.r), dtype=np.float32)  # kept to make queries (128 MB at 1M)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            z = self.centres[self.rng.integers(0, len(self.centres), stop - start)]
            z = z + self.spread * self.rng.standard_normal((stop - start, self.r), dtype=np.float32)
            self.z[start:stop] = z
            self.embed(z, x[start:stop], self.noise)
            if start // chunk % 8 == 0:
                log(f"generated {stop:,} / {n:,} vectors")

    def queries(self, nq: int, seed: int) -> np.ndarray:
        """A photo is near its tile, not equal: the tile's latent moved by 0.1 x N(0, I) plus new noise."""
        rng = np.random.default_rng(seed + 1)
        rows = np.sort(rng.choice(len(self.z), nq, replace=False))
        q = np.empty((nq, self.d), dtype=np.float32)
        self.embed(self.z[rows] + 0.1 * rng.standard_normal((nq, self.r), dtype=np.float32), q, self.noise)
        return q


class Clusters:
    """A hard case kept for comparison: normalise(0.8 c + 1.0 B z + 0.5 e), c one of ``clusters`` random unit
    centres, B z a variation in one *shared* r-d latent subspace, e isotropic noise.

    At 1M (4096 centres) its spectrum is nearly flat over all 2048 dims and a vector's top-100 are same-z
    vectors from ~100 different clusters, i.e. scattered over IVF lists that k-means aligns with the
    clusters: IVF recall@100 stays ~0.5 at 1.6 % of the lists and PCA256 loses most of the signal. Real
    descriptors are not like that, but it shows how IVF/PQ fail when neighbours are not local.
    """

    def __init__(self, d: int, clusters: int, r: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.d, self.rng = d, rng
        self.centres = rng.standard_normal((clusters, d), dtype=np.float32)
        faiss.normalize_L2(self.centres)
        basis, _ = np.linalg.qr(rng.standard_normal((d, r)))
        self.basis = np.ascontiguousarray(basis.T, dtype=np.float32)  # (r, d), orthonormal rows

    def fill(self, x: np.ndarray, chunk: int = 32768) -> None:
        n, d = x.shape
        r = self.basis.shape[0]
        self.x = x
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            part = x[start:stop]
            self.rng.standard_normal(out=part, dtype=np.float32)
            part *= np.float32(0.5 / math.sqrt(d))
            part += 0.8 * self.centres[self.rng.integers(0, len(self.centres), stop - start)]
            part += (
                self.rng.standard_normal((stop - start, r), dtype=np.float32) / np.float32(math.sqrt(r))
            ) @ self.basis
            faiss.normalize_L2(part)
            if start // chunk % 8 == 0:
                log(f"generated {stop:,} / {n:,} vectors")

    def queries(self, nq: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed + 1)
        r = self.basis.shape[0]
        q = self.x[np.sort(rng.choice(len(self.x), nq, replace=False))].copy()
        q += (rng.standard_normal((nq, r), dtype=np.float32) * np.float32(0.3 / math.sqrt(r))) @ self.basis
        q += rng.standard_normal((nq, self.d), dtype=np.float32) * np.float32(0.3 / math.sqrt(self.d))
        faiss.normalize_L2(q)
        return q


def load_real(
    path: str, nq: int, queries_path: str | None, seed: int
) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    """Real descriptors (memory-mapped .npy) copied once into Flat storage; queries held out or from a file."""
    src = np.load(path, mmap_mode="r")
    if src.ndim != 2:
        raise SystemExit(f"{path}: expected an (n, d) array, got shape {src.shape}")
    n_all, d = src.shape
    if queries_path:
        q = np.ascontiguousarray(np.load(queries_path), dtype=np.float32)
        keep = np.ones(n_all, dtype=bool)
    else:
        held = np.random.default_rng(seed).choice(n_all, nq, replace=False)
        q = np.ascontiguousarray(src[np.sort(held)], dtype=np.float32)
        keep = np.ones(n_all, dtype=bool)
        keep[held] = False
    faiss.normalize_L2(q)
    flat, x = flat_with_storage(int(keep.sum()), d)
    at = 0
    for start in range(0, n_all, 65536):
        part = np.ascontiguousarray(src[start : start + 65536][keep[start : start + 65536]], dtype=np.float32)
        faiss.normalize_L2(part)
        x[at : at + len(part)] = part
        at += len(part)
    return flat, x, q


# --------------------------------------------------------------------------------------------- measure


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(
        len(np.intersect1d(f[f >= 0], t, assume_unique=True)) for f, t in zip(found, truth, strict=True)
    )
    return hits / (k * len(truth))


def top1_found(found: np.ndarray, truth: np.ndarray) -> float:
    """R1@k: the fraction of queries whose exact nearest neighbour (their own tile) is in the approximate top-k.

    What retrieval needs before re-ranking / geometric verification of the k candidates; recall@k (all k exact
    neighbours found) is much stricter: it also counts swaps among near-equal scores at the tail.
    """
    return float(np.mean([t[0] in f for f, t in zip(found, truth, strict=True)]))


def time_search(index, q, k, single: int, **kw) -> tuple[float, float, np.ndarray]:
    """(ms per query in one batch, median ms of single-query calls, ids of the batch)."""
    t = time.perf_counter()
    _, ids = fi.search(index, q, k, **kw)
    batch_ms = (time.perf_counter() - t) * 1e3 / len(q)
    times = []
    for i in range(min(single, len(q))):
        t = time.perf_counter()
        fi.search(index, q[i], k, **kw)
        times.append((time.perf_counter() - t) * 1e3)
    return batch_ms, float(np.median(times)) if times else float("nan"), ids


def knob_of(index: faiss.Index) -> tuple[str | None, int | None]:
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexPreTransform | faiss.IndexIDMap | faiss.IndexIDMap2):
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, faiss.IndexIVF):
        return "nprobe", idx.nprobe
    if isinstance(idx, faiss.IndexHNSW):
        return "ef_search", idx.hnsw.efSearch
    return None, None


def coarse_nlist(factory: str) -> int | None:
    """nlist of a plain 'IVF{nlist},...' factory whose quantizer can be shared (no pre-transform, flat quantizer)."""
    head = factory.split(",")[0]
    if head.startswith("IVF") and head[3:].isdigit():
        return int(head[3:])
    return None


def shared_quantizer(
    x: np.ndarray, nlist: int, train_size: int, seed: int, cache: dict
) -> tuple[faiss.Index, float]:
    if nlist not in cache:
        n_train = min(len(x), max(train_size, fi.POINTS_PER_CENTROID * nlist))
        rows = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
        sample = np.ascontiguousarray(x[rows])
        ivf = fi.make_index(x.shape[1], f"IVF{nlist},Flat")
        log(f"coarse k-means: {nlist} centroids on {n_train:,} vectors")
        t = time.perf_counter()
        ivf.train(sample)
        cache[nlist] = (faiss.clone_index(faiss.extract_index_ivf(ivf).quantizer), time.perf_counter() - t)
        log(f"coarse k-means done in {cache[nlist][1]:.1f}s")
        del sample, ivf
    return cache[nlist]


def write_report(args, rows, quantizers, n, d, nq, n_allowed, data_desc, final: bool) -> None:
    """Print the table (final) and (re)write the JSON, also after each factory so a cut run keeps its rows."""
    k = args.k
    ref = rows[0]
    lines = [
        f"search_scale: n={n:,} d={d} queries={nq} k={k} threads={args.threads} ({data_desc})",
        f"filtered: {n_allowed:,} allowed ids ({n_allowed / n:.1%}), recall vs exact over the allowed set; "
        f"peak RSS {peak_rss_gb():.1f} GB",
    ]
    if quantizers:
        lines.append(
            "coarse k-means (shared by IVF rows): "
            + ", ".join(f"IVF{nl}: {s:.0f}s" for nl, (_, s) in sorted(quantizers.items()))
        )
    head = (
        f"{'factory':24} {'setting':24} {'train s':>7} {'add s':>6} {'MB':>8} {'mem x':>6} "
        f"{'ms/q batch':>10} {'speed x':>7} {'ms single':>9} {'speed x':>7} {'recall@' + str(k):>10} "
        f"{'R1@' + str(k):>7} "
        f"{'filt rec':>8} {'filt ms/q':>9}"
    )
    lines += [head, "-" * len(head)]

    def fmt(v, spec):
        return format(v, spec) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-"

    for r in rows:
        lines.append(
            f"{r['factory']:24} {r['setting']:24} {r['train_s']:7.1f} {r['add_s']:6.1f} {r['bytes'] / 1e6:8.1f} "
            f"{ref['bytes'] / r['bytes']:6.1f} {fmt(r['batch_ms'], '10.3f')} "
            f"{fmt(ref['batch_ms'] / r['batch_ms'] if r['batch_ms'] else None, '7.1f')} "
            f"{fmt(r['single_ms'], '9.2f')} "
            f"{fmt(ref['single_ms'] / r['single_ms'] if r['single_ms'] else None, '7.1f')} "
            f"{r['recall']:10.3f} {r['r1']:7.3f} {fmt(r['filtered_recall'], '8.3f')} {fmt(r['filtered_ms'], '9.3f')}"
        )
    lines.append(
        "mem x / speed x: Flat's bytes / ms divided by the row's (higher is better). recall@k: share of the exact "
        "top-k found; R1@k: share of queries whose exact top-1 is in the top-k; filt: with the id filter, at the "
        "index's default nprobe/efSearch (widened by the filter)."
    )
    text = "\n".join(lines)
    if final:
        print(text, flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                dict(
                    complete=final,
                    n=n,
                    dim=d,
                    queries=nq,
                    k=k,
                    threads=args.threads,
                    data=data_desc,
                    allowed=n_allowed,
                    coarse_kmeans_s={str(nl): s for nl, (_, s) in quantizers.items()},
                    peak_rss_gb=peak_rss_gb(),
                    faiss=faiss.__version__,
                    machine=platform.processor() or platform.machine(),
                    total_s=time.perf_counter() - T0,
                    rows=rows,
                    table=text,
                ),
                indent=1,
            )
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="database vectors (synthetic)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=None, help="default n/244, in [16, 4096]")
    ap.add_argument("--data", choices=["manifold", "clusters"], default="manifold", help="synthetic model")
    ap.add_argument("--intrinsic", type=int, default=32, help="latent dimension")
    ap.add_argument(
        "--spread", type=float, default=1.0, help="manifold: latent spread around cluster centres"
    )
    ap.add_argument("--noise", type=float, default=0.5, help="manifold: isotropic noise, relative to signal")
    ap.add_argument(
        "--factories",
        nargs="+",
        default=None,
        help="factory strings; {nlist} is replaced by ~4 sqrt(n). Default: SQ8, PQ256, PQ64, PCAR256+PQ64 "
        "under IVF{nlist}, plus HNSW32 up to 200k vectors (its graph makes it bigger than Flat)",
    )
    ap.add_argument("--nprobes", default=None, help="comma list; default nlist/256, nlist/64, nlist/16")
    ap.add_argument("--efs", default="32,128,512", help="HNSW efSearch values")
    ap.add_argument("--train-size", type=int, default=None, help="training sample (default: build()'s)")
    ap.add_argument("--single", type=int, default=20, help="single-query calls timed per setting")
    ap.add_argument("--filter-frac", type=float, default=0.01, help="allowed fraction for the filtered row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", default=None, help="(n, d) .npy of real descriptors instead of synthetic")
    ap.add_argument("--real-queries", default=None, help="(nq, d) .npy of real query descriptors")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    k = args.k

    if args.real:
        flat, x, q = load_real(args.real, args.queries, args.real_queries, args.seed)
        n, d = x.shape
        data_desc = f"real descriptors {args.real}"
        log(f"loaded {n:,} x {d} real vectors, {len(q)} queries")
    else:
        n, d = args.n, args.dim
        clusters = args.clusters or max(16, min(4096, n // 244))
        log(f"allocating {n:,} x {d} float32 = {n * d * 4 / 1e9:.1f} GB")
        flat, x = flat_with_storage(n, d)
        if args.data == "manifold":
            gen = Manifold(d, clusters, args.intrinsic, args.spread, args.noise, args.seed)
            data_desc = (
                f"synthetic manifold: {args.intrinsic}-d latent, {clusters} latent clusters, spread {args.spread}, "
                f"noise {args.noise}"
            )
        else:
            gen = Clusters(d, clusters, args.intrinsic, args.seed)
            data_desc = f"synthetic clusters (hard case): {clusters} centres + shared {args.intrinsic}-d latent + noise"
        gen.fill(x)
        q = gen.queries(args.queries, args.seed)

    # IVF{nlist} as auto chose before the compressed preset: ~4 sqrt(n) as a power of two, >= 256
    nlist_default = min(65536, 1 << max(8, round(math.log2(4 * math.sqrt(max(n, fi.FLAT_MAX_VECTORS))))))
    nlist_default = min(nlist_default, 1 << int(math.log2(max(1, n // fi.POINTS_PER_CENTROID))))
    factories = args.factories or [
        "IVF{nlist},SQ8",
        "IVF{nlist},PQ256",
        "IVF{nlist},PQ64",
        "PCAR256,IVF{nlist},PQ64",
    ] + (["HNSW32"] if n <= 200_000 else [])
    factories = [f.replace("{nlist}", str(nlist_default)) for f in factories]
    efs = [int(v) for v in args.efs.split(",")]

    rng = np.random.default_rng(args.seed + 2)
    allowed = np.sort(rng.choice(n, max(k, int(n * args.filter_frac)), replace=False))

    # ---- exact reference
    log(f"exact search: {len(q)} queries over {n:,} vectors")
    flat_bytes = fi.index_nbytes(fi.make_index(d, "Flat")) + n * d * 4
    batch_ms, single_ms, truth = time_search(flat, q, k, args.single)
    log("exact filtered search")
    t = time.perf_counter()
    _, truth_f = fi.search(flat, q, k, allowed_ids=allowed)
    flat_filtered_ms = (time.perf_counter() - t) * 1e3 / len(q)
    rows = [
        dict(
            factory="Flat",
            setting="exact",
            train_s=0.0,
            add_s=0.0,
            bytes=flat_bytes,
            batch_ms=batch_ms,
            single_ms=single_ms,
            recall=1.0,
            r1=1.0,
            filtered_recall=1.0,
            filtered_ms=flat_filtered_ms,
        )
    ]
    log(f"exact: {batch_ms:.2f} ms/query batch, {single_ms:.1f} ms single")

    quantizers: dict[int, tuple[faiss.Index, float]] = {}
    for factory in factories:
        write_report(args, rows, quantizers, n, d, len(q), len(allowed), data_desc, final=False)
        gc.collect()
        log(f"building {factory}")
        index = fi.make_index(d, factory)
        nl = coarse_nlist(factory)
        kmeans_s = None
        if nl is not None:
            ts = args.train_size or max(fi.POINTS_PER_CENTROID * nl, 100_000)
            quant, kmeans_s = shared_quantizer(x, nl, ts, args.seed, quantizers)
            ivf = faiss.extract_index_ivf(index)
            ivf.own_fields = False  # the clone below outlives this index (kept in `quantizers`)
            ivf.quantizer = quant
        marks = {}

        def progress(frac: float, msg: str, marks=marks, factory=factory) -> None:
            if msg.startswith("trained"):
                marks["trained"] = time.perf_counter()
            if int(frac * 10) != marks.get("decile"):
                marks["decile"] = int(frac * 10)
                log(f"  {factory}: {frac:.0%} {msg}")

        t = time.perf_counter()
        try:
            index = fi.build(x, index, train_size=args.train_size, progress=progress, seed=args.seed)
        except Exception as exc:  # report and go on with the other factories
            log(f"  {factory} failed: {exc}")
            continue
        total = time.perf_counter() - t
        train_s = marks.get("trained", t) - t
        add_s = total - train_s
        nbytes = fi.index_nbytes(index)
        log(f"  built in {total:.1f}s ({nbytes / 1e6:.0f} MB)")
        knob, default = knob_of(index)
        settings = efs if knob == "ef_search" else None
        if knob == "nprobe":
            nlist = faiss.extract_index_ivf(index).nlist
            settings = (
                [int(v) for v in args.nprobes.split(",")]
                if args.nprobes
                else sorted({max(1, nlist // 256), max(1, nlist // 64), max(1, nlist // 16)})
            )
        t = time.perf_counter()
        _, ids_f = fi.search(index, q, k, allowed_ids=allowed)
        filtered_ms = (time.perf_counter() - t) * 1e3 / len(q)
        filtered_recall = recall_at(ids_f, truth_f)
        built = dict(factory=factory, train_s=train_s, add_s=add_s, coarse_kmeans_s=kmeans_s, bytes=nbytes)
        for value in settings or [None]:
            kw = {knob: value} if knob and value is not None else {}
            b_ms, s_ms, ids = time_search(index, q, k, args.single, **kw)
            row = dict(
                built,
                setting=f"{knob}={value}" if kw else "-",
                batch_ms=b_ms,
                single_ms=s_ms,
                recall=recall_at(ids, truth),
                r1=top1_found(ids, truth),
                filtered_recall=filtered_recall if value in (None, default) else None,
                filtered_ms=filtered_ms if value in (None, default) else None,
            )
            rows.append(row)
            log(
                f"  {row['setting']}: recall@{k} {row['recall']:.3f}, {b_ms:.3f} ms/q batch, {s_ms:.2f} ms single"
            )
        if default not in (settings or [None]):
            ids_default = fi.search(index, q, k)[1]
            rows.append(
                dict(
                    built,
                    setting=f"{knob}={default} (default)",
                    batch_ms=None,
                    single_ms=None,
                    recall=recall_at(ids_default, truth),
                    r1=top1_found(ids_default, truth),
                    filtered_recall=filtered_recall,
                    filtered_ms=filtered_ms,
                )
            )
        del index
    gc.collect()

    write_report(args, rows, quantizers, n, d, len(q), len(allowed), data_desc, final=True)
    log(f"done in {time.perf_counter() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
