"""The compressed index (``--factory compressed``) at world scale: RAM, latency and recall vs exact search.

    nice -n 10 .venv/bin/python bench/index_scale.py --work /tmp/idxscale --sizes 1M,4M

One run prints, for the ``compressed`` preset (IVF + 4-bit fast-scan PQ codes in RAM, exact re-ranking of the
best candidates from float16 vectors memory-mapped from disk; engine/retrieval/faiss_index.py):
bytes in RAM (the serialised candidate index) vs Flat, bytes on disk, ms per query (single queries with the
vector file in the page cache and evicted from it, and in a batch), recall@1/10/100 vs exact search and the
share of queries whose exact top-1 is returned first, plus a search-area (id filter) row; on synthetic
2048-d databases of each ``--sizes`` and on real descriptors.

Real descriptors: the default model's (1280-d) descriptors of the ISS pool (../shared/data/iss, as
bench/retrieval_iss.py indexes it) and of the bundled sample rasters + ../shared/data/rasters (tiles of 128
and 256 px), with the ISS photos as queries; indexes are built under ``--work`` (or reused: ``--iss-index``,
``--rasters-index``).

Synthetic data "with the statistics of real descriptors" (:class:`Synth`): measured on the real descriptors
(:func:`measure`), then reproduced in 2048-d:
- the common mean (real: |mean|^2 ~ 0.63 of a unit vector; every descriptor shares it);
- the spectrum of the centred covariance, a power law lambda_i ~ i^-alpha fitted on the real eigenvalues
  10..300 and extended to 2048 dims (the real data have 1280 dims and ~10k vectors: rank-limited);
- a hierarchy: scene clusters (64 tiles) > places (8 overlapping tiles) > tile > rotation (4 vectors per
  tile, tile-major ids as in an index folder), whose variance shares are fitted so that, at the real
  database size, the synthetic data reproduce the real rotation-sibling similarity and the similarity of
  each tile's 1st/10th/100th most similar other tile (:func:`calibrate`);
- queries (photos) are a random tile's shared part mixed with fresh noise, scaled so that the cosine of a
  query to its tile matches the real photos' cosine to their best overlapping tile.
The components are drawn in the eigenbasis and turned by one fixed random rotation (so the spectrum is not
aligned with the PQ sub-spaces), then L2-normalised and stored as float16 (the exact reference uses the same
float16 values). Exact ground truth streams the float16 file in chunks (4M x 2048 x 4 bytes would not fit in
RAM). Every stage is kept under ``--work`` and skipped when already done: the run is resumable per size;
``--clean`` deletes a size's big files after it is measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import glob
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_times, percent, steal_share  # noqa: E402
from engine.retrieval import faiss_index as fi  # noqa: E402
from engine.retrieval.faiss_runtime import faiss  # noqa: E402  (as the engine imports it)

T0 = time.perf_counter()
#: The parameters of the synthetic data of the last calibration (the figures in results/index_scale.txt).
PARAMS_FILE = ROOT / "bench" / "results" / "index_scale_params.json"
CHUNK = 65536  # rows per generation / ground-truth chunk (512 MiB of float32 at 2048-d)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * mult)


# ------------------------------------------------------------------------------------------- real data


def collect_real(work: Path, iss_index: str | None, rasters_index: str | None) -> dict:
    """Real descriptors (tile-major, 4 rotations) of the ISS pool and the rasters, ISS photo descriptors and
    the ids of the tiles overlapping each photo's footprint. Cached in ``work/real.npz``."""
    cache = work / "real.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    from bench import retrieval_iss as riss
    from engine import api
    from engine.imagery.photos import read_image
    from engine.retrieval.index_store import open_index

    photos = riss.load_photos()
    iss_dir = Path(iss_index) if iss_index else work / "index-iss"
    if not (iss_dir / "manifest.json").exists():
        log(f"building the ISS pool index in {iss_dir}")
        pool = riss.pool_folder(photos, work)
        api.index([str(pool)], str(iss_dir), backend="onnx", exclude=["surrounding_*"])
    ras_dir = Path(rasters_index) if rasters_index else work / "index-rasters"
    partial = ras_dir.with_name(ras_dir.name + ".partial") / "chunks"
    if not (ras_dir / "manifest.json").exists() and partial.is_dir() and any(partial.iterdir()):
        # an interrupted build of the rasters index: its finished descriptor chunks are real descriptors
        # (tile-major, 4 rotations) of the first tiles, enough for statistics
        x_ras = np.concatenate([np.load(f) for f in sorted(partial.glob("*.npy"))])
        log(f"rasters: {len(x_ras):,} descriptors from the chunks of an interrupted build in {partial}")
    elif not (ras_dir / "manifest.json").exists():
        srcs = [str(ROOT / "sample" / "naip_2009.tif"), str(ROOT / "sample" / "naip_2018.tif")]
        srcs += sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "rasters" / "*.tif")))
        log(f"building the rasters index in {ras_dir} ({len(srcs)} rasters)")
        api.index(srcs, str(ras_dir), backend="onnx", tile_sizes=(128, 256))
    iss = open_index(iss_dir)
    if (ras_dir / "manifest.json").exists():
        ras = open_index(ras_dir)
        if iss.model_id != ras.model_id:
            raise SystemExit(f"the two real indexes have different models: {iss.model_id} / {ras.model_id}")
        x_ras = ras.faiss.reconstruct_n(0, ras.faiss.ntotal)
    x_iss = iss.faiss.reconstruct_n(0, iss.faiss.ntotal)
    m = iss.manifest["model"]
    enc = api.get_encoder(m["name"], iss.manifest["build"].get("weights"), "onnx", m["input_size"])
    log(f"encoding {len(photos)} ISS photos with {enc.model_id}")
    q = np.concatenate([enc.encode(read_image(p["photo"])[None]) for p in photos]).astype(np.float32)
    pos = np.full((len(photos), 64), -1, dtype=np.int64)
    for i, p in enumerate(photos):
        tiles = [t for t, f in enumerate(iss.tiles.footprints) if f.intersection(p["footprint"]).area > 0]
        pos[i, : min(64, len(tiles))] = tiles[:64]
    out = dict(
        x_iss=x_iss,
        x_ras=x_ras,
        q_iss=q,
        pos_iss=pos,
        model=np.array(iss.model_id),
        n_iss_tiles=len(iss.tiles),
    )
    np.savez(cache, **out)
    return out


def measure(
    x: np.ndarray, q: np.ndarray | None = None, pos: np.ndarray | None = None, spectrum: bool = True
) -> dict:
    """Statistics of (n, d) unit descriptors, tile-major with 4 rotations per tile."""
    n, d = x.shape
    mu = x.mean(0)
    alpha, cs = float("nan"), np.full(d, np.nan)
    if spectrum:
        ev = np.linalg.svd(x - mu, compute_uv=False) ** 2 / n
        ev = ev / ev.sum()
        ks = np.arange(10, min(300, n - 10))
        alpha = -float(np.polyfit(np.log(ks + 1), np.log(ev[ks]), 1)[0])
        cs = np.cumsum(ev)
    g = x @ x.T
    t = np.arange(n) // 4
    same = t[:, None] == t[None, :]
    np.fill_diagonal(g, np.nan)
    sib = float(np.nanmean(np.where(same, g, np.nan)))
    other = np.where(same, -np.inf, g)
    other = np.nan_to_num(other, nan=-np.inf)
    # each tile's similarity to other tiles: best rotation pair (max over the 4 x 4 pairs)
    nt = n // 4
    tile_sim = other[: nt * 4].reshape(nt, 4, nt, 4).max(axis=(1, 3))
    srt = -np.sort(-tile_sim, axis=1)
    stats = dict(
        n=n,
        dim=d,
        mean_sq=float(mu @ mu),
        alpha=alpha,
        var_top=[float(cs[k - 1]) for k in (8, 32, 128) if k <= len(cs)],
        sibling_cos=sib,
        random_cos=float(np.nanmean(np.where(same, np.nan, g))),
        other_tile_cos=[float(srt[:, r - 1].mean()) for r in (1, 10, 100) if r <= nt - 1],
    )
    if q is not None:
        s = q @ x.T
        stats["query_top1_cos"] = float(s.max(1).mean())
        if pos is not None:
            best = []
            for i, row in enumerate(pos):
                tiles = row[row >= 0]
                if tiles.size:
                    best.append(s[i, (tiles[:, None] * 4 + np.arange(4)).ravel()].max())
            stats["query_positive_cos"] = float(np.mean(best))
            stats["queries_with_positive"] = len(best)
    return stats


# --------------------------------------------------------------------------------------- synthetic data


def fwht(a: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of the rows (length a power of two)."""
    n, d = a.shape
    h = 1
    while h < d:
        a = a.reshape(n, d // (2 * h), 2, h)
        a = np.stack((a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]), axis=2)
        h *= 2
    return a.reshape(n, d) * np.float32(1 / math.sqrt(d))


class Synth:
    """Hierarchical Gaussian descriptors with a power-law spectrum around a common mean (module docstring)."""

    TILES_PER_PLACE = 8
    PLACES_PER_CLUSTER = 8
    BLOCK = 16384  # tiles whose own latents are drawn together (seeded by block: any tile can be redrawn)

    def __init__(self, dim: int, params: dict, seed: int = 0):
        self.dim, self.p, self.seed = dim, params, seed
        rng = np.random.default_rng(seed)
        lam = np.arange(1, dim + 1, dtype=np.float64) ** -params["alpha"]
        lam *= (1.0 - params["mean_sq"]) / lam.sum()
        self.scale = np.sqrt(lam).astype(np.float32)
        mu = rng.standard_normal(dim)
        mu *= math.sqrt(params["mean_sq"]) / np.linalg.norm(mu)
        self.mu = mu.astype(np.float32)
        # a fixed random orthogonal map, cheap at 4M x 2048 (a dense rotation would be 34 TFLOP): signs,
        # Walsh-Hadamard, permutation, signs, Walsh-Hadamard (a dense QR rotation for other dims)
        self.signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(2, dim))
        self.perm = rng.permutation(dim)
        self.rot = None
        if dim & (dim - 1):
            rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            self.rot = np.ascontiguousarray(rot.T, dtype=np.float32)

    def _latent(self, idx: np.ndarray, level: str) -> np.ndarray:
        """Deterministic N(0, I) latent of each cluster / place / tile id (seeded by id: any chunk order)."""
        out = np.empty((idx.size, self.dim), dtype=np.float32)
        salt = {"cluster": 1, "place": 2, "tile": 3}[level]
        for j, i in enumerate(idx):
            out[j] = np.random.default_rng([self.seed, salt, int(i)]).standard_normal(
                self.dim, dtype=np.float32
            )
        return out

    def tile_part(self, tiles: np.ndarray) -> np.ndarray:
        """The part of each tile's vectors its 4 rotations share (whitened coordinates), variance 1 - s_rot."""
        p = self.p
        places = tiles // self.TILES_PER_PLACE
        n_places = max(1, int(p["n_tiles"]) // self.TILES_PER_PLACE)
        n_clusters = max(1, n_places // self.PLACES_PER_CLUSTER)
        clusters = (places * 2654435761) % n_clusters  # clusters scattered over the id range
        uc, ic = np.unique(clusters, return_inverse=True)
        up, ip = np.unique(places, return_inverse=True)
        z = math.sqrt(p["s_cluster"]) * self._latent(uc, "cluster")[ic]
        z += math.sqrt(p["s_place"]) * self._latent(up, "place")[ip]
        z += math.sqrt(p["s_tile"]) * self._tile_latent(tiles)
        return z

    def _tile_latent(self, tiles: np.ndarray) -> np.ndarray:
        out = np.empty((tiles.size, self.dim), dtype=np.float32)
        blocks = tiles // self.BLOCK
        for b in np.unique(blocks):
            drawn = np.random.default_rng([self.seed, 4, int(b)]).standard_normal(
                (self.BLOCK, self.dim), dtype=np.float32
            )
            sel = blocks == b
            out[sel] = drawn[tiles[sel] - b * self.BLOCK]
        return out

    def to_data(self, z: np.ndarray) -> np.ndarray:
        y = z * self.scale
        if self.rot is not None:
            y = y @ self.rot
        else:
            y = fwht(fwht(y * self.signs[0])[:, self.perm] * self.signs[1])
        x = np.ascontiguousarray(y, dtype=np.float32) + self.mu
        faiss.normalize_L2(x)
        return x

    def vectors(self, start_tile: int, stop_tile: int) -> np.ndarray:
        """Rows of tiles [start, stop) x 4 rotations, tile-major, float32 unit vectors."""
        tiles = np.arange(start_tile, stop_tile)
        shared = np.repeat(self.tile_part(tiles), 4, axis=0)
        rng = np.random.default_rng([self.seed, 5, start_tile])
        shared += math.sqrt(self.p["s_rot"]) * rng.standard_normal(shared.shape, dtype=np.float32)
        return self.to_data(shared)

    def queries(self, nq: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(queries, their tile ids): a tile's shared part x a + fresh noise (total variance 1)."""
        rng = np.random.default_rng([self.seed, 6, seed])
        tiles = np.sort(rng.choice(int(self.p["n_tiles"]), nq, replace=False))
        a = self.p["query_keep"]
        z = a * self.tile_part(tiles)
        z += math.sqrt(max(0.0, 1 - a * a * (1 - self.p["s_rot"]))) * rng.standard_normal(
            z.shape, dtype=np.float32
        )
        return self.to_data(z), tiles


def synth_params(real: dict, s_cluster: float, s_place: float, query_keep: float, n_tiles: int) -> dict:
    s_rot = 1.0 - (real["sibling_cos"] - real["mean_sq"]) / (1.0 - real["mean_sq"])
    s_rot = min(max(s_rot, 0.05), 0.95)
    s_tile = max(0.0, 1.0 - s_rot - s_cluster - s_place)
    return dict(
        alpha=real["alpha"],
        mean_sq=real["mean_sq"],
        s_rot=s_rot,
        s_cluster=s_cluster,
        s_place=s_place,
        s_tile=s_tile,
        query_keep=query_keep,
        n_tiles=n_tiles,
    )


def calibrate(real: dict, dim: int) -> tuple[dict, dict]:
    """Variance shares (cluster, place) and the query mix that reproduce the real neighbour profile at the
    real database size (a small grid; cost: seconds)."""
    nt = real["n"] // 4
    target = np.array(real["other_tile_cos"])
    best = None
    for s_cluster in (0.05, 0.1, 0.2, 0.3):
        for s_place in (0.0, 0.1, 0.2, 0.3):
            params = synth_params(real, s_cluster, s_place, 0.8, nt)
            if params["s_tile"] <= 0:
                continue
            gen = Synth(dim, params, seed=11)
            st = measure(gen.vectors(0, nt), spectrum=False)
            err = float(np.abs(np.array(st["other_tile_cos"]) - target).sum())
            err += abs(st["sibling_cos"] - real["sibling_cos"])
            if best is None or err < best[0]:
                best = (err, params, st)
    _, params, _ = best
    gen = Synth(dim, params, seed=11)
    x = gen.vectors(0, nt)
    st = measure(x)
    if "query_positive_cos" in real:  # the query mix: cosine of a query to its own tile
        for keep in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            params["query_keep"] = keep
            q, tiles = gen.queries(64, seed=3)
            own = np.einsum("qd,qrd->qr", q, x.reshape(nt, 4, -1)[tiles]).max(1).mean()
            if own >= real["query_positive_cos"]:
                break
        st["query_positive_cos"] = float(own)
    return params, st


# ------------------------------------------------------------------------------------------ one size


def _write_chunk(job: tuple) -> int:
    path, gen, t0, t1 = job
    out = np.load(path, mmap_mode="r+")
    out[t0 * 4 : t1 * 4] = gen.vectors(t0, t1)
    out.flush()
    del out
    return t1


def generate(path: Path, gen: Synth, n: int) -> np.memmap:
    """The float16 database at ``path`` (resumable: a ``.done`` marker per finished run)."""
    done = path.with_suffix(".done")
    if done.exists():
        return np.load(path, mmap_mode="r")
    d = gen.dim
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    del out
    tiles_per_chunk = CHUNK // 4
    spans = [(t0, min(n // 4, t0 + tiles_per_chunk)) for t0 in range(0, n // 4, tiles_per_chunk)]
    # one process per core: the generator is single-threaded numpy (RNG, Walsh-Hadamard), and each chunk is
    # seeded by its own tile ids, so the file is the same whatever the number of processes
    workers = max(1, min(os.cpu_count() or 1, len(spans)))
    # spawned, not forked: a child forked after this process ran FAISS/BLAS threads (an earlier size) can
    # deadlock on the OpenMP runtime's locks (seen: a 1M generation after the 100k size hung, CPUs idle)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        for i, t1 in enumerate(pool.map(_write_chunk, [(path, gen, t0, t1) for t0, t1 in spans])):
            if i % 8 == 0 or i == len(spans) - 1:
                log(f"generated {t1 * 4:,} / {n:,} ({workers} processes)")
    done.write_text("ok")
    return np.load(path, mmap_mode="r")


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple:
    """Brute-force top-k by inner product, streaming float16 rows in chunks (float32 arithmetic)."""
    nq = len(q)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    rows = np.arange(len(x)) if allowed is None else np.sort(allowed)
    for start in range(0, rows.size, CHUNK):
        r = rows[start : start + CHUNK]
        part = np.asarray(x[r[0] : r[-1] + 1] if allowed is None else x[r], dtype=np.float32)
        s = q @ part.T
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(r, s.shape)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recalls(ids: np.ndarray, truth: np.ndarray, scores=None, truth_scores=None, eps: float = 1e-6) -> dict:
    """recall@k: share of the exact top-k found in the top-k. With scores, an exact tie counts as found: a
    returned id whose exact score equals the k-th exact score (duplicate tiles, e.g. the same raster indexed
    twice, score the same and either is exact)."""
    out = {}
    for k in (1, 10, 100):
        if truth.shape[1] >= k:
            hits = []
            for i, (a, b) in enumerate(zip(ids, truth, strict=True)):
                ok = np.isin(a[:k], b[:k])
                if scores is not None:
                    ok |= (scores[i, :k] >= truth_scores[i, k - 1] - eps) & (a[:k] >= 0)
                hits.append(min(k, int(ok.sum())) / k)
            out[f"recall@{k}"] = float(np.mean(hits))
    same = ids[:, 0] == truth[:, 0]
    if scores is not None:
        same |= scores[:, 0] >= truth_scores[:, 0] - eps
    out["top1_equal"] = float(np.mean(same))
    return out


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (only this file; harmless to other processes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: Warm-up passes at most before the timed single-query pass (see measure_index).
WARM_PASSES = 4


def major_faults() -> int:
    """This process's major page faults so far (pages read from disk through a mapping)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def time_single(index, q: np.ndarray, k: int, **kw) -> float:
    times = []
    for row in q:
        t = time.perf_counter()
        fi.search(index, row, k, **kw)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def time_cold(index, q: np.ndarray, k: int, vec_path: Path, **kw) -> float:
    """Median single-query time with the float16 vector file out of the page cache before each query.

    posix_fadvise(DONTNEED) cannot drop pages that a live mapping holds, so before each query the index's
    mapping is released (and with it the last mapping of the file: the caller holds no other), the file
    evicted, and a fresh mapping made: the query's candidate rows then come from disk.
    """
    times = []
    for row in q:
        index.vectors = None
        gc.collect()
        evict(vec_path)
        index.vectors = np.load(vec_path, mmap_mode="r")
        t = time.perf_counter()
        fi.search(index, row, k, **kw)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def own_tile_found(ids: np.ndarray, q_tiles: np.ndarray, k_tiles: int) -> float:
    """Share of queries whose own tile (the tile the query was made from) is among the first ``k_tiles``
    distinct tiles of the result: the localisation recall, for exact search and for the index alike."""
    found = 0
    for row, tile in zip(ids, q_tiles, strict=True):
        tiles = list(dict.fromkeys(int(v) // 4 for v in row if v >= 0))[:k_tiles]
        found += int(tile) in tiles
    return found / len(q_tiles)


def set_k_factor(index, k_factor: int | float | None) -> float | None:
    """Set the k_factor of the Refine stage of ``index`` (a setting ``k_factor=N``: candidates of the codes'
    scan = N x those the refinement keeps); returns the previous one (None: unchanged or no Refine)."""
    if k_factor is None:
        return None
    base = index.base if isinstance(index, fi.RerankIndex) else index
    refine = next((lay for lay in fi._layers(base) if isinstance(lay, faiss.IndexRefine)), None)
    if refine is None:
        raise SystemExit(f"k_factor={k_factor}: the index has no Refine stage")
    before, refine.k_factor = refine.k_factor, float(k_factor)
    return before


def measure_index(
    index,
    q,
    truth,
    truth_s,
    k: int,
    single: int,
    settings: list[dict],
    vec_path: Path | None,
    q_tiles=None,
) -> list:
    rows = []
    fi.search(index, q[:1], k)  # one-time costs out of the timings (the re-rank imports torch on first use)
    for setting in settings:
        kw = dict(setting)
        refine = set_k_factor(index, kw.pop("k_factor", None))
        t = time.perf_counter()
        sc, ids = fi.search(index, q, k, **kw)
        batch_ms = (time.perf_counter() - t) * 1e3 / len(q)
        cold = None
        if vec_path is not None:  # every query's rows read from disk (nothing of the file cached or mapped)
            cold = time_cold(index, q[:single], k, vec_path, **kw)
        # the same queries again: the first pass reads their rows back into the page cache (each cold query
        # evicted the whole file, so after time_cold only the last query's rows are cached). A fast-scan's
        # candidates differ by some rows from run to run (ties at its last candidates: 10-98 of 10,000 at 4M,
        # session 28), so the next pass still reads those from disk (2223 major faults in 30 queries): warm
        # up until a pass reads under one page a query, at most WARM_PASSES times; the faults of the timed
        # pass are reported
        for _ in range(WARM_PASSES):
            before = major_faults()
            time_single(index, q[:single], k, **kw)
            if major_faults() - before < single:
                break
        before, ticks = major_faults(), cpu_times()
        warm = time_single(index, q[:single], k, **kw)
        warm_faults, warm_steal = major_faults() - before, steal_share(ticks, cpu_times())
        task = {f"own@{t}": own_tile_found(ids, q_tiles, t) for t in (1, 10)} if q_tiles is not None else {}
        set_k_factor(index, refine)
        rows.append(
            dict(
                setting=setting,
                batch_ms=batch_ms,
                single_ms=warm,
                single_major_faults=warm_faults,
                single_cpu_steal=warm_steal,
                single_cold_ms=cold,
                **recalls(ids, truth, sc, truth_s),
                **task,
            )
        )
        log(f"  {setting}: {rows[-1]}")
    return rows


def run_size(n: int, args, params: dict, report: dict) -> None:
    key = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"
    if args.factory:  # another candidate index on the same data: its own report entry and files
        key += f" {args.factory}"
    before = report["sizes"].get(key, {})
    if before.get("complete") and not args.remeasure:
        log(f"{key}: already measured (in {args.work}/report.json; --remeasure to measure it again)")
        return
    work = Path(args.work) / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    d = args.dim
    p = dict(params, n_tiles=n // 4)
    gen = Synth(d, p, seed=args.seed)
    log(f"{key}: generating {n:,} x {d} float16 ({n * d * 2 / 1e9:.1f} GB) in {work}")
    t = time.perf_counter()
    x16 = generate(work / "db.npy", gen, n)
    gen_s = time.perf_counter() - t
    q, q_tiles = gen.queries(args.queries, seed=args.seed + 1)
    k = 100
    gt_path = work / "truth.npz"
    rng = np.random.default_rng(args.seed + 2)  # a search area: a contiguous 1 % of the tiles (a region)
    a0 = int(rng.integers(0, n // 4 - n // 400))
    area_tiles = np.arange(a0, a0 + n // 400)
    area = (area_tiles[:, None] * 4 + np.arange(4)).ravel()
    if gt_path.exists():
        z = np.load(gt_path)
        truth, truth_area, truth_s, truth_area_s = (
            z["truth"],
            z["truth_area"],
            z["truth_s"],
            z["truth_area_s"],
        )
    else:
        log(f"{key}: exact ground truth ({len(q)} queries, streamed)")
        t = time.perf_counter()
        truth_s, truth = exact_topk(x16, q, k)
        truth_area_s, truth_area = exact_topk(x16, q, 10, allowed=area)
        log(f"{key}: exact ground truth in {time.perf_counter() - t:.0f}s")
        np.savez(gt_path, truth=truth, truth_area=truth_area, truth_s=truth_s, truth_area_s=truth_area_s)
    factory = args.factory or fi.compressed_factory(n, d)
    # another factory's index has its own files (named after it), never one built for a different factory
    idx_path = work / (
        f"index-{re.sub(r'[^A-Za-z0-9]+', '_', factory)}.faiss" if args.factory else "index.faiss"
    )
    vec_path = fi.rerank_file(idx_path)
    build_s = None
    if vec_path.exists() and idx_path.exists():
        index = fi.read_index(idx_path)
    else:
        log(f"{key}: building {factory}")
        t = time.perf_counter()
        marks = {}

        def progress(frac: float, msg: str) -> None:
            if int(frac * 10) != marks.get("decile"):
                marks["decile"] = int(frac * 10)
                log(f"  {frac:.0%} {msg}")

        built = fi.build(x16, factory, progress=progress, seed=args.seed)
        build_s = time.perf_counter() - t
        # write_index(built) would copy the float16 vectors (16 GB at 4M) into index.f16.npy: the database file
        # already is exactly that file (float16 .npy, same rows), so link it instead of copying it
        fi.write_index(built.base, idx_path)
        vec_path.unlink(missing_ok=True)
        os.link(work / "db.npy", vec_path)
        del built
        index = fi.read_index(idx_path)
    ram = fi.index_nbytes(index, idx_path)
    flat = n * d * 4
    nlist = faiss.extract_index_ivf(index.base).nlist
    default_nprobe = faiss.extract_index_ivf(index.base).nprobe
    settings = [{}]
    for probe in sorted({int(v) for v in args.nprobes.split(",")} if args.nprobes else set()):
        settings.append({"nprobe": min(nlist, probe)})
    for rr in sorted({int(v) for v in args.reranks.split(",")} if args.reranks else set()):
        settings.append({"rerank": rr})
    for combo in args.settings.split(";") if args.settings else []:  # e.g. nprobe=2048:rerank=8000
        kw = {k.strip(): int(v) for k, v in (part.split("=") for part in combo.split(":") if part.strip())}
        settings.append({k: min(nlist, v) if k == "nprobe" else v for k, v in kw.items()})  # (and k_factor)
    log(f"{key}: measuring ({len(settings)} settings)")
    del x16  # its mapping (the same inode as index.f16.npy) would keep the file's pages in the cache
    gc.collect()
    rows = measure_index(index, q, truth, truth_s, k, args.single, settings, vec_path, q_tiles)
    exact_task = {f"own@{t}": own_tile_found(truth, q_tiles, t) for t in (1, 10)}
    t = time.perf_counter()
    sc_area, ids_area = fi.search(index, q, 10, allowed_ids=area)
    area_ms = (time.perf_counter() - t) * 1e3 / len(q)
    area_rec = recalls(ids_area, truth_area, sc_area, truth_area_s)
    report["sizes"][key] = dict(
        complete=True,
        n=n,
        dim=d,
        factory=factory,
        nlist=nlist,
        default_nprobe=default_nprobe,
        rerank=index.rerank,
        ram_bytes=ram,
        flat_bytes=flat,
        disk_f16_bytes=os.path.getsize(vec_path),
        gen_s=before["gen_s"] if before.get("complete") else gen_s,  # data reused: its first generation time
        # a re-measured index keeps the build time measured when it was built
        build_s=build_s if build_s is not None else before.get("build_s"),
        queries=len(q),
        rows=rows,
        area=dict(vectors=int(area.size), ms_per_query=area_ms, **area_rec),
        exact_own=exact_task,
        peak_rss_gb=peak_rss_gb(),
    )
    save(report, args)
    if args.clean:
        for f in ("db.npy", "db.done", idx_path.name, vec_path.name):
            (work / f).unlink(missing_ok=True)
        log(f"{key}: deleted the big files in {work}")


def run_real(real: dict, args, report: dict) -> None:
    """The preset on the real descriptors (ISS pool + rasters, 1280-d): ISS photos and held-out tiles as
    queries, recall vs exact over the same database."""
    if report.get("real", {}).get("complete") and not args.remeasure:
        return
    x = np.concatenate([real["x_iss"], real["x_ras"]]).astype(np.float32)
    nt = len(x) // 4
    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(nt, min(200, nt // 10), replace=False))
    keep = np.ones(nt, dtype=bool)
    keep[held] = False
    db = x.reshape(nt, 4, -1)[keep].reshape(-1, x.shape[1])
    q_tiles = x.reshape(nt, 4, -1)[
        held, 0
    ]  # a held-out tile (rotation 0) as query: its neighbours are others
    q = np.concatenate([real["q_iss"], q_tiles]).astype(np.float32)
    faiss.normalize_L2(q)
    flat = fi.build(db, "Flat")
    k = min(100, len(db))
    truth_s, truth = fi.search(flat, q, k)
    factory = fi.compressed_factory(len(db), db.shape[1])
    index = fi.build(db, factory)
    fi.search(index, q[:1], k)  # one-time costs out of the timings (the re-rank imports torch on first use)
    rows = []
    for kw in ({}, {"rerank": 500}, {"rerank": 200}):
        t = time.perf_counter()
        sc, ids = fi.search(index, q, k, **kw)
        ms = (time.perf_counter() - t) * 1e3 / len(q)
        m = len(real["q_iss"])
        r_photo = recalls(ids[:m], truth[:m], sc[:m], truth_s[:m])
        r_tile = recalls(ids[m:], truth[m:], sc[m:], truth_s[m:])
        rows.append(dict(setting=kw, batch_ms=ms, photos=r_photo, held_out_tiles=r_tile))
    report["real"] = dict(
        complete=True,
        n=len(db),
        dim=db.shape[1],
        factory=factory,
        ram_bytes=fi.index_nbytes(index),
        flat_bytes=fi.index_nbytes(flat),
        photo_queries=len(real["q_iss"]),
        tile_queries=len(q_tiles),
        rows=rows,
    )
    save(report, args)


def save(report: dict, args) -> None:
    Path(args.work, "report.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def render(r: dict) -> str:
    st, syn = r["real_stats"], r["synth_stats"]
    lines = [
        f"index_scale: the 'compressed' preset; faiss {faiss.__version__}, {r['threads']} threads, "
        f"{platform.machine()}, {os.cpu_count()} cores",
        f"command: {r['command']}",
        *r.get("notes", []),
        "",
        f"real descriptors ({r['model']}, {st['dim']}-d, {st['n']:,} vectors = ISS pool + sample/shared rasters):",
        f"  |mean|^2 {st['mean_sq']:.3f}  spectrum slope alpha {st['alpha']:.2f}  variance in top 8/32/128 PCs "
        + "/".join(f"{v:.2f}" for v in st["var_top"])
        + f"  rotation-sibling cos {st['sibling_cos']:.3f}  random pair cos {st['random_cos']:.3f}",
        "  cos of each tile's 1st/10th/100th most similar other tile: "
        + "/".join(f"{v:.3f}" for v in st["other_tile_cos"])
        + f"; ISS photos: top-1 cos {st.get('query_top1_cos', float('nan')):.3f}, cos to best overlapping tile "
        f"{st.get('query_positive_cos', float('nan')):.3f} ({st.get('queries_with_positive', 0)} photos)",
        f"synthetic at the same size, {r['dim']}-d (shares: "
        + ", ".join(
            f"{k} {r['params'][k]:.2f}" for k in ("s_cluster", "s_place", "s_tile", "s_rot", "query_keep")
        )
        + "):",
        f"  |mean|^2 {syn['mean_sq']:.3f}  alpha {syn['alpha']:.2f}  variance in top 8/32/128 PCs "
        + "/".join(f"{v:.2f}" for v in syn["var_top"])
        + f"  sibling cos {syn['sibling_cos']:.3f}  random pair cos {syn['random_cos']:.3f}  other tiles "
        + "/".join(f"{v:.3f}" for v in syn["other_tile_cos"])
        + f"  query->own tile cos {syn.get('query_positive_cos', float('nan')):.3f}",
        "",
    ]
    head = (
        f"{'n':>4} {'factory':28} {'setting':26} {'RAM MB':>8} {'x Flat':>7} {'disk GB':>7} {'ms batch':>8} "
        f"{'ms single':>9} {'ms cold':>8} {'R@1':>6} {'R@10':>6} {'R@100':>6} {'top1=':>6} {'own@1':>6} "
        f"{'own@10':>6}"
    )
    lines += [head, "-" * len(head)]
    for key, s in r["sizes"].items():
        if not s.get("complete"):
            continue
        for row in s["rows"]:
            setting = ",".join(f"{k}={v}" for k, v in row["setting"].items()) or (
                f"default {s['default_nprobe']}/{s['rerank']}"
            )
            cold = row["single_cold_ms"]
            lines.append(
                f"{key.split()[0]:>4} {s['factory']:28} {setting:26} {s['ram_bytes'] / 1e6:8.1f} "
                f"{s['flat_bytes'] / s['ram_bytes']:7.1f} {s['disk_f16_bytes'] / 1e9:7.2f} {row['batch_ms']:8.2f} "
                f"{row['single_ms']:9.2f} {cold if cold is not None else float('nan'):8.2f} "
                f"{row['recall@1']:6.3f} {row['recall@10']:6.3f} {row['recall@100']:6.3f} {row['top1_equal']:6.3f} "
                f"{row.get('own@1', float('nan')):6.3f} {row.get('own@10', float('nan')):6.3f}"
            )
        faults = [row.get("single_major_faults") for row in s["rows"]]
        if any(f is not None for f in faults):
            lines.append(
                f"{key.split()[0]:>4} ms single: major page faults in its timed pass (rows read from disk), by "
                "setting: " + " / ".join("-" if f is None else str(f) for f in faults)
            )
        steal = [row.get("single_cpu_steal") for row in s["rows"]]
        if any(v is not None for v in steal):
            lines.append(
                f"{key.split()[0]:>4} ms single: CPU time taken by other guests of this virtual machine's host "
                "during its timed pass (steal), by setting: " + " / ".join(percent(v) for v in steal)
            )
        ex = s.get("exact_own", {})
        lines.append(
            f"{key.split()[0]:>4} {'exact search (Flat)':28} {'-':26} {s['flat_bytes'] / 1e6:8.1f} {1.0:7.1f} {'-':>7} {'-':>8} "
            f"{'-':>9} {'-':>8} {1.0:6.3f} {1.0:6.3f} {1.0:6.3f} {1.0:6.3f} {ex.get('own@1', float('nan')):6.3f} "
            f"{ex.get('own@10', float('nan')):6.3f}"
        )
        a = s["area"]
        lines.append(
            f"{key.split()[0]:>4} search area: {a['vectors']:,} allowed vectors (a contiguous 1 % of the tiles): recall@10 "
            f"{a['recall@10']:.3f}, top-1 equal {a['top1_equal']:.3f}, {a['ms_per_query']:.2f} ms/query (batch)"
        )
        built = f"{s['build_s']:.0f}s" if s["build_s"] else "- (not built by this bench)"
        lines.append(
            f"{key:>4} build {built}, generation {s['gen_s']:.0f}s, "
            f"{s['queries']} queries, peak RSS {s['peak_rss_gb']:.1f} GB"
        )
    if r.get("real", {}).get("complete"):
        rr = r["real"]
        lines += [
            "",
            f"real descriptors: {rr['n']:,} x {rr['dim']} ({rr['factory']}; RAM {rr['ram_bytes'] / 1e6:.2f} MB vs Flat "
            f"{rr['flat_bytes'] / 1e6:.2f} MB); {rr['photo_queries']} ISS photos + {rr['tile_queries']} held-out tiles "
            "as queries, recall vs exact over the same vectors:",
        ]
        for row in rr["rows"]:
            setting = ",".join(f"{k}={v}" for k, v in row["setting"].items()) or "default"
            for what in ("photos", "held_out_tiles"):
                m = row[what]
                lines.append(
                    f"  {setting:12} {what:15} R@1 {m['recall@1']:.3f}  R@10 {m['recall@10']:.3f}  "
                    f"R@100 {m['recall@100']:.3f}  top-1 equal {m['top1_equal']:.3f}  ({row['batch_ms']:.2f} ms/q)"
                )
    lines += [
        "",
        "default a/b: the preset's defaults, nprobe a and b candidates re-ranked. RAM: the serialised "
        "candidate index (IVF centroids, PQ codebooks, 4-bit codes, 8-byte ids); x Flat: Flat's "
        "n x d x 4 bytes / RAM. disk: the float16 vectors (memory-mapped; re-ranking reads ~rerank rows per "
        "query). ms single: median single query with the rows it reads in the page cache; ms cold: the same "
        "with the vector file out of the page cache before each query (mapping released, "
        "posix_fadvise(DONTNEED), mapped again): its candidate rows are read from this machine's disk. ms batch: "
        "per query in one call of all the queries. R@k: share of the exact "
        "top-k ids returned in the top-k; top1=: share of queries whose returned first id is the exact first. "
        "own@k: share of queries whose own tile (the one the synthetic query was made from) is among the first k "
        "distinct tiles (the localisation recall; exact search's own row is the reference).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/index_scale", help="data, indexes and the resumable report")
    ap.add_argument("--sizes", default="1M,4M", help="database sizes (vectors), comma-separated")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--single", type=int, default=50, help="single-query calls timed per setting")
    ap.add_argument("--nprobes", default="", help="extra nprobe settings to measure (comma list)")
    ap.add_argument("--reranks", default="", help="extra rerank settings to measure (comma list)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iss-index", default=None, help="an existing index of the ISS pool (default model)")
    ap.add_argument("--rasters-index", default=None, help="an existing index of the rasters")
    ap.add_argument(
        "--settings",
        default="",
        help="more search settings, each 'nprobe=N:rerank=M' (and k_factor=K for a Refine stage), separated by ';' "
        "(measured as a whole)",
    )
    ap.add_argument(
        "--factory", default="", help="measure this '+rerank' factory string instead of the compressed preset"
    )
    ap.add_argument("--clean", action="store_true", help="delete each size's big files once measured")
    ap.add_argument(
        "--remeasure",
        action="store_true",
        help="measure sizes already in the report again (search code changed), reusing their data, ground "
        "truth and index files and keeping their build times",
    )
    ap.add_argument(
        "--params",
        default=None,
        help=f"the synthetic data's parameters from an earlier run (a JSON such as {PARAMS_FILE.name}) instead of "
        "calibrating them on the real descriptors: the same databases, truth and queries as that run, whatever "
        "the default model is now",
    )
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from the saved report, no run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_scale_lite1.txt"))
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rep_path = work / "report.json"
    report = json.loads(rep_path.read_text()) if rep_path.exists() else {"sizes": {}}
    if args.render_only:
        save(report, args)
        print(render(report), flush=True)
        return 0
    report["threads"] = args.threads
    niceness = os.nice(0)  # what this run's command line was, not what the docstring suggests
    report["command"] = (
        f"{f'nice -n {niceness} ' if niceness else ''}.venv/bin/python bench/index_scale.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    )
    report["dim"] = args.dim

    real = collect_real(work, args.iss_index, args.rasters_index)
    x_real = np.concatenate([real["x_iss"], real["x_ras"]])
    report["model"] = str(real["model"])
    if "params" not in report and args.params:  # the synthetic data of an earlier run, exactly
        saved = json.loads(Path(args.params).read_text())
        report.update({k: saved[k] for k in ("params", "real_stats", "synth_stats") if k in saved})
        log(f"synthetic-data parameters from {args.params}: {report['params']}")
    if "params" not in report:
        log(f"measuring real descriptors ({x_real.shape[0]:,} x {x_real.shape[1]})")
        stats = measure(x_real)
        iss_q = measure(real["x_iss"], real["q_iss"], real["pos_iss"])
        stats.update({k: iss_q[k] for k in ("query_top1_cos", "query_positive_cos", "queries_with_positive")})
        log(f"real: {stats}")
        params, syn = calibrate(stats, args.dim)
        log(f"calibrated: {params} -> {syn}")
        report.update(real_stats=stats, params=params, synth_stats=syn)
        save(report, args)
        Path(PARAMS_FILE).write_text(
            json.dumps({k: report[k] for k in ("model", "params", "real_stats", "synth_stats")}, indent=1)
            + "\n"
        )
        log(f"wrote {PARAMS_FILE} (give it as --params to make the same data again)")
    run_real(real, args, report)
    for size in args.sizes.split(","):
        if size.strip():
            run_size(parse_size(size), args, report["params"], report)
    save(report, args)
    print(render(report), flush=True)  # (--render-only: just this, from the saved report)
    log(f"done in {time.perf_counter() - T0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
