"""The compressed index (``--factory compressed``): IVF + 4-bit PQ codes in RAM find candidates, the full
vectors (float16, memory-mapped from the index folder) re-rank them exactly (faiss_index.RerankIndex)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from imagery import SAMPLE, read_window
from PIL import Image

from engine import api
from engine.errors import IndexNotFoundError, InputError
from engine.geo.search_area import SearchArea
from engine.imagery.photos import read_image
from engine.retrieval import faiss_index as fi
from engine.retrieval import search as tile_search
from engine.retrieval.index_store import FAISS_FILE, VECTORS_FILE, is_index_folder, open_index


def world(
    n_tiles: int, dim: int, n_queries: int, seed: int = 0, keep: float = 0.6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database (n_tiles * 4, dim), queries, each query's own tile) with the structure of real descriptors.

    A compact copy of bench/index_scale.py's generator, with the figures it measured on the default model's
    real descriptors (ISS pool + rasters): a common mean (|mean|^2 0.58), a power-law spectrum (alpha 1.04),
    scene clusters (64 tiles) > places (8 tiles) > tile > rotation (4 vectors per tile, tile-major) with
    variance shares 0.30 / 0.30 / 0.09 / 0.31, and queries as far from their tile as real photos (a tile's
    shared part x 0.6 + fresh noise: cos to its tile ~0.78).
    """
    rng = np.random.default_rng(seed)
    lam = np.arange(1, dim + 1) ** -1.04
    scale = np.sqrt(lam * (1 - 0.58) / lam.sum()).astype(np.float32)
    mu = rng.standard_normal(dim)
    mu = (mu * math.sqrt(0.58) / np.linalg.norm(mu)).astype(np.float32)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    places = np.arange(n_tiles) // 8
    clusters = rng.integers(0, max(1, n_tiles // 64), places.max() + 1)[places]
    c_lat = rng.standard_normal((clusters.max() + 1, dim), dtype=np.float32)
    p_lat = rng.standard_normal((places.max() + 1, dim), dtype=np.float32)
    shared = math.sqrt(0.3) * c_lat[clusters] + math.sqrt(0.3) * p_lat[places]
    shared += math.sqrt(0.09) * rng.standard_normal((n_tiles, dim), dtype=np.float32)

    def to_data(z: np.ndarray) -> np.ndarray:
        x = (z * scale) @ rot + mu
        faiss.normalize_L2(x)
        return x

    z = np.repeat(shared, 4, axis=0)
    z += math.sqrt(0.31) * rng.standard_normal(z.shape, dtype=np.float32)
    q_tiles = rng.choice(n_tiles, n_queries, replace=False)
    zq = keep * shared[q_tiles]
    zq += math.sqrt(1 - keep * keep * 0.69) * rng.standard_normal(zq.shape, dtype=np.float32)
    return to_data(z), to_data(zq), q_tiles


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([np.isin(a[:k], b[:k]).mean() for a, b in zip(ids, truth, strict=True)]))


@pytest.fixture(scope="module")
def big():
    """200k vectors (50k tiles x 4 rotations), 128-d: a few hundred thousand vectors as the issue asks, at a
    dimension that keeps the test under a minute on 2 shared cores (2048-d would be 1.6 GB and minutes of
    k-means; bench/index_scale.py measures 2048-d)."""
    x, q, q_tiles = world(50_000, 128, 200)
    flat = fi.build(x, "Flat")
    truth_s, truth = fi.search(flat, q, 100)
    index = fi.build(x, "compressed")
    return x, q, q_tiles, truth_s, truth, index


def test_recall_at_100_and_exact_top1_on_200k_vectors(big):
    """recall@100 >= 0.995 vs exact and the exact top-1, with photo-like queries (cos ~0.78 to their tile).

    The preset below SHORT_CODES_MIN_VECTORS: 2 bits a dimension (64 x 4-bit codes of the 128 dims) rank
    finely enough that a few thousand candidates hold the exact top-100; at 128-d the codes' score error is
    wider relative to the band of the exact top-100 than at 2048-d, so the default 1000 candidates fall a
    little short. Measured here: defaults recall@100 0.978, recall@10 1.0, top-1 1.0; rerank=4000: 0.9997
    (PCAR120,...,PQ60x4fsr, the preset of sessions 23-25: 0.976 and 0.9997; the 1-bit codes of the earlier
    preset needed 16000 for 0.994).
    """
    x, q, _, truth_s, truth, index = big
    assert isinstance(index, fi.RerankIndex)
    assert fi.compressed_factory(len(x), 128) == "IVF512,PQ64x4fsr+rerank"
    _, ids = fi.search(index, q, 100)  # the defaults
    assert recall(ids, truth, 100) >= 0.96 and recall(ids, truth, 10) >= 0.995
    assert np.array_equal(ids[:, 0], truth[:, 0])
    scores, ids = fi.search(index, q, 100, rerank=4000)  # 2 % of the database re-ranked
    assert recall(ids, truth, 100) >= 0.995
    assert np.array_equal(ids[:, 0], truth[:, 0])  # the exact top-1, every query
    # scores are exact inner products (of the vectors as stored), in order
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # RAM holds the codes: 32 B a vector (+ 8 B id and the centroids) instead of 512 B
    assert fi.index_nbytes(index) * 10 < x.nbytes


def test_rotation_dedup_and_search_area_on_200k_vectors(big, tmp_path):
    """One hit per tile over the 4 rotations, and an id filter (a search area) inside the candidate search."""
    x, q, q_tiles, _, _, index = big
    fi.write_index(index, tmp_path / FAISS_FILE)
    reopened = fi.read_index(tmp_path / FAISS_FILE)
    assert isinstance(reopened, fi.RerankIndex) and isinstance(reopened.vectors, np.memmap)
    assert reopened.vectors.dtype == np.float16 and reopened.vectors.shape == x.shape
    tiles = np.arange(10_000, 12_000)  # a region: 2,000 of the 50,000 tiles (8,000 vectors)
    allowed = (tiles[:, None] * 4 + np.arange(4)).ravel()
    flat16 = fi.build(np.asarray(reopened.vectors, dtype=np.float32), "Flat")
    exact_s, exact = fi.search(flat16, q, 10, allowed_ids=allowed)
    got_s, got = fi.search(reopened, q, 10, allowed_ids=allowed)
    assert np.isin(got, allowed).all()
    assert recall(got, exact, 10) >= 0.99 and np.array_equal(got[:, 0], exact[:, 0])
    np.testing.assert_allclose(got_s, exact_s, atol=1e-5)

    class Stub:  # what engine.retrieval.search needs of a TileIndex
        faiss = reopened
        n_rotations = 4
        manifest = {"rotations": [0, 90, 180, 270]}

    hits = tile_search.search(Stub(), q[:20], 10, tiles=tiles)
    for row in hits:
        ids = [h.tile_id for h in row]
        assert len(ids) == len(set(ids)) == 10 and set(ids) <= set(tiles.tolist())
    hits = tile_search.search(Stub(), q[:20], 10)

    class Exact(Stub):
        faiss = flat16

    exact = tile_search.search(Exact(), q[:20], 10)
    same = [
        (a[0].tile_id, a[0].rotation_deg) == (b[0].tile_id, b[0].rotation_deg)
        for a, b in zip(hits, exact, strict=True)
    ]
    assert sum(same) >= 19  # the same best tile, at the same rotation


def test_small_filter_is_scored_exactly(big):
    x, q, _, _, _, index = big
    allowed = np.arange(0, 800, 3)  # fewer ids than the candidates re-ranked: no candidate search at all
    flat = fi.build(x[: allowed.max() + 1], "Flat")
    exact_s, exact = fi.search(flat, q, 5, allowed_ids=allowed)
    got_s, got = fi.search(index, q, 5, allowed_ids=allowed)
    assert np.array_equal(got, exact)
    np.testing.assert_allclose(got_s, exact_s, atol=1e-6)


@pytest.fixture(scope="module")
def sample_compressed(tmp_path_factory):
    """The bundled 2018 NAIP raster indexed with --factory compressed (as conftest's sample_index, but
    compressed): 384-px tiles, 50% overlap, the default model at 224 px."""
    out = tmp_path_factory.mktemp("idx") / "naip2018-compressed"
    manifest = api.index(
        [str(SAMPLE / "naip_2018.tif")], str(out), tile_sizes=(384,), input_size=224, factory="compressed"
    )
    return out, manifest


def test_sample_index_folder_with_the_preset(sample_compressed, tmp_path):
    """A real index folder of the bundled sample built with --factory compressed: files, manifest, search with
    a search area, the same result after a reopen and from a copy of the folder, RAM part smaller than Flat."""
    out, manifest = sample_compressed
    assert manifest["factory"].endswith(fi.RERANK_SUFFIX) and manifest["factory"].startswith("IVF")
    assert json.loads((out / "manifest.json").read_text())["factory"] == manifest["factory"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", FAISS_FILE, VECTORS_FILE, "tiles.gpkg"}
    assert is_index_folder(out)

    idx = open_index(out)
    assert isinstance(idx.faiss, fi.RerankIndex)
    n, dim = idx.faiss.ntotal, idx.faiss.d
    assert n == 4 * len(idx.tiles)
    vectors = np.load(out / VECTORS_FILE)
    assert vectors.dtype == np.float16 and vectors.shape == (n, dim)
    ram = fi.index_nbytes(idx.faiss, out / FAISS_FILE)
    assert ram < n * dim * 4  # Flat would hold n x dim float32

    centre = idx.tiles.footprints[len(idx.tiles) // 2].centroid
    area = SearchArea(near=(centre.y, centre.x), radius_km=0.6)
    allowed = set(area.select(idx.tiles.footprints).tolist())
    assert 0 < len(allowed) < len(idx.tiles)
    query = vectors[4 * (len(idx.tiles) // 2) + 1].astype(np.float32)[None]  # that tile at 90 degrees
    hits = tile_search.search(idx, query, 5, tile_search.allowed_tiles(idx, area))[0]
    assert hits[0].tile_id == len(idx.tiles) // 2 and hits[0].rotation_deg == 90
    assert hits[0].score == pytest.approx(float(query[0] @ query[0]), abs=1e-4)
    assert {h.tile_id for h in hits} <= allowed

    flat = fi.build(vectors.astype(np.float32), "Flat")  # the same search, exact, over the stored vectors
    exact = fi.search(flat, query, 20)[1][0]
    assert [h.tile_id for h in tile_search.search(idx, query, 5)[0]] == list(dict.fromkeys(exact // 4))[:5]

    again = open_index(out)  # survives a reopen, and a move of the folder
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for other in (again, open_index(moved)):
        assert tile_search.search(other, query, 5, tile_search.allowed_tiles(other, area))[0] == hits

    photo = tmp_path / "photo.png"  # the whole pipeline: a photo through api.localize with the area
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", 192, 192, 384)).save(photo)
    res = api.localize([str(photo)], idx, top_k=3, area=area)
    assert res.photos[0].status == "ok" and {c.tile_id for c in res.photos[0].candidates} <= allowed


def test_a_compressed_folder_without_its_vectors_is_refused(sample_compressed, tmp_path):
    x, _, _ = world(200, 32, 1)
    folder = tmp_path / "idx"
    folder.mkdir()
    fi.write_index(fi.build(x, "compressed"), folder / FAISS_FILE)
    assert (folder / VECTORS_FILE).is_file()
    np.save(folder / VECTORS_FILE, np.zeros((10, 32), dtype=np.float16))  # not this index's vectors
    with pytest.raises(InputError, match="do not belong together"):
        fi.read_index(folder / FAISS_FILE)
    # an index folder whose manifest says +rerank but lost index.f16.npy: said clearly
    out = tmp_path / "sample"
    shutil.copytree(sample_compressed[0], out)
    os.remove(out / VECTORS_FILE)
    with pytest.raises(IndexNotFoundError, match=VECTORS_FILE):
        open_index(out)


def test_bad_input_is_refused_clearly():
    x, _, _ = world(8, 32, 1)  # 32 vectors: too few to train any codebook
    with pytest.raises(InputError, match="at least 39 vectors.*'Flat'"):
        fi.build(x, "compressed")
    with pytest.raises(InputError, match="at least 39 vectors"):
        fi.check_buildable(len(x), 32, "compressed")
    with pytest.raises(InputError, match="depends on the database size"):
        fi.make_index(32, "compressed")
    x, _, _ = world(200, 32, 1)
    with pytest.raises(InputError, match="ids cannot be given"):
        fi.build(x, "compressed", ids=np.arange(len(x)) + 1000)
    index = fi.build(x, "IVF4,PQ8x4fsr+rerank")  # any factory + '+rerank' is a compressed index
    assert isinstance(index, fi.RerankIndex) and index.ntotal == len(x)
    with pytest.raises(InputError, match="cannot be added"):
        fi.add_vectors(index, x)
    with pytest.raises(InputError, match="rerank must be a positive integer"):
        fi.search(index, x[:1], 5, rerank=0)


def test_auto_picks_the_preset_above_the_flat_limit():
    assert fi.suggest_factory(fi.FLAT_MAX_VECTORS - 1, 2048) == "Flat"
    assert fi.suggest_factory(fi.FLAT_MAX_VECTORS, 2048) == fi.compressed_factory(fi.FLAT_MAX_VECTORS, 2048)
    # from HALF_BIT_CODES_MIN_VECTORS up: half a bit a dimension, 10,000 candidates
    assert fi.suggest_factory(4_000_000, 2048) == "PCAB1920,IVF2048,PQ240x4fsr+rerank"
    assert fi.suggest_factory(fi.HALF_BIT_CODES_MIN_VECTORS - 1, 2048) == "PCAB1920,IVF1024,PQ480x4fsr+rerank"
    assert fi.suggest_factory(fi.HALF_BIT_CODES_MIN_VECTORS, 1280) == "PCAB1200,IVF1024,PQ150x4fsr+rerank"
    assert fi.suggest_factory(fi.HALF_BIT_CODES_MIN_VECTORS, 1000) == "PCAB936,IVF1024,PQ117x4fsr+rerank"
    # ... not for low-dimensional descriptors (fewer than 64 sub-quantizers)
    assert fi.suggest_factory(4_000_000, 256) == "PCAB240,IVF2048,PQ60x4fsr+rerank"
    # 1 bit for each of 1920 balanced-PCA dimensions: 240 B a vector, 31x less than Flat with ids and matrices
    assert fi.check_buildable(1_000_000, 2048, "auto") == "PCAB1920,IVF1024,PQ480x4fsr+rerank"
    assert fi.check_buildable(1_000_000, 2048, "compressed") == "PCAB1920,IVF1024,PQ480x4fsr+rerank"
    # below SHORT_CODES_MIN_VECTORS: 2 bits for every dimension, no PCA
    assert fi.suggest_factory(fi.SHORT_CODES_MIN_VECTORS - 1, 2048) == "IVF512,PQ1024x4fsr+rerank"
    assert fi.suggest_factory(fi.SHORT_CODES_MIN_VECTORS, 2048) == "PCAB1920,IVF512,PQ480x4fsr+rerank"
    assert fi.suggest_factory(fi.SHORT_CODES_MIN_VECTORS, 1280) == "PCAB1200,IVF512,PQ300x4fsr+rerank"
    # too few dims for a PCA and d'/4 sub-quantizers, or too many for its matrices to pay back at 500k
    assert fi.compressed_factory(1_000_000, 24) == "IVF1024,PQ12x4fsr+rerank"
    assert fi.compressed_factory(500_000, 16384).startswith("IVF512,PQ8192x4fsr")
    assert fi.compressed_factory(10_000_000, 16384).startswith("PCAB15360,")


def test_the_short_codes_are_smaller_and_get_more_candidates_by_default(tmp_path):
    """The preset's two forms, built: the balanced PCA's 1-bit codes take about half the RAM of the 2-bit
    codes of every dim, and their index re-ranks SHORT_CODE_RERANK candidates by default, also once written
    and read back (the count is read from the codes, so it needs no file of its own); 2-bit codes and a
    factory without PQ keep DEFAULT_RERANK, codes under a bit a dimension get COARSE_CODE_RERANK (unless a
    refinement with other codes ranks the candidates), and an explicit rerank wins."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((20_000, 256)).astype(np.float32) * (np.arange(1, 257) ** -0.6).astype(np.float32)
    faiss.normalize_L2(x)
    short = fi.build(x, "PCAB240,IVF64,PQ60x4fsr+rerank", seed=0)
    fine = fi.build(x, "IVF64,PQ128x4fsr+rerank", seed=0)
    assert (short.rerank, fine.rerank) == (fi.SHORT_CODE_RERANK, fi.DEFAULT_RERANK)
    assert fi.index_nbytes(short) < 0.75 * fi.index_nbytes(fine)
    fi.write_index(short, tmp_path / FAISS_FILE)
    assert fi.read_index(tmp_path / FAISS_FILE).rerank == fi.SHORT_CODE_RERANK
    assert fi.build(x[:2000], "IVF4,SQ8+rerank").rerank == fi.DEFAULT_RERANK
    assert fi.RerankIndex(short.base, short.vectors, rerank=50).rerank == 50
    coarse = fi.build(x, "PCAB240,IVF64,PQ30x4fsr+rerank", seed=0)  # 8 dims a 4-bit code: half a bit each
    assert coarse.rerank == fi.COARSE_CODE_RERANK
    assert fi.build(x, "PCAB240,IVF64,PQ30x4fsr,Refine(Flat)+rerank", seed=0).rerank == fi.DEFAULT_RERANK


def test_search_settings_per_run(sample_compressed, sample_index, tmp_path):
    """--nprobe / --rerank per localize run (issue 15: they were fixed at build time): probing every list
    and re-ranking every vector gives the exact ranking; rerank on a Flat index is refused clearly."""
    from engine.cli import main as cli_main

    out, _ = sample_compressed
    idx = open_index(out)
    photo = tmp_path / "photo.png"
    Image.fromarray(read_window(SAMPLE / "naip_2018.tif", 500, 300, 384)).save(photo)
    nlist = faiss.extract_index_ivf(idx.faiss.base).nlist
    res = api.localize([str(photo)], idx, top_k=5, nprobe=nlist, rerank=idx.faiss.ntotal)
    vectors = np.load(out / VECTORS_FILE).astype(np.float32)
    desc = api.get_encoder("default", None, "onnx", 224, None).encode(read_image(photo)[None])
    exact = fi.search(fi.build(vectors, "Flat"), desc, 40)[1][0]
    assert [c.tile_id for c in res.photos[0].candidates] == list(dict.fromkeys(exact // 4))[:5]
    assert (
        cli_main(["localize", str(photo), "--index", str(out), "--nprobe", "1", "--rerank", "8", "--quiet"])
        == 0
    )
    assert cli_main(["localize", str(photo), "--index", str(sample_index), "--rerank", "8", "--quiet"]) == 3
    with pytest.raises(InputError, match="positive integer"):
        api.localize([str(photo)], idx, top_k=5, nprobe=0)


def test_prefetch_ranges_cover_every_candidate_row():
    """The MADV_WILLNEED ranges of a cold query: page-aligned, disjoint, every row's bytes inside one."""
    import mmap

    rng = np.random.default_rng(5)
    for first, row_bytes in ((128, 4096), (128, 2560), (0, 256), (4096 + 80, 1000)):
        rows = np.unique(rng.integers(0, 50_000, 700))
        runs = fi._page_runs(first, row_bytes, rows)
        starts = np.array([a for a, _ in runs])
        stops = np.array([b for _, b in runs])
        assert np.all(starts % mmap.PAGESIZE == 0) and np.all(starts[1:] > stops[:-1])
        lo, hi = first + rows * row_bytes, first + (rows + 1) * row_bytes
        which = np.searchsorted(starts, lo, side="right") - 1
        assert np.all(lo >= starts[which]) and np.all(hi <= stops[which])
        assert len(runs) < rows.size or row_bytes < mmap.PAGESIZE // 2  # neighbours merged
    assert fi._page_runs(128, 4096, np.array([0, 1, 5])) == [(0, 8320), (20480, 24704)]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64])
def test_the_candidates_are_deduplicated_and_sorted_as_np_unique_does(dtype):
    rng = np.random.default_rng(8)
    for values in (
        np.array([], dtype=dtype),
        np.array([7], dtype=dtype),
        np.array([3, 3, 3], dtype=dtype),
        rng.integers(0, 5000, 20_000).astype(dtype),  # many repeats
        rng.permutation(10_000).astype(dtype),  # none
    ):
        got, want = fi._sorted_unique(values), np.unique(values)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_rerank_from_a_memory_mapped_file_equals_the_array(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 96)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    q = rng.standard_normal(96).astype(np.float32)
    rows = np.unique(rng.integers(0, 3000, 400))
    want = x[rows].astype(np.float64) @ q.astype(np.float64)
    tol = dict(rtol=1e-5, atol=1e-5 * np.abs(want).max())  # float32 sums in another order than BLAS's
    np.testing.assert_allclose(fi._exact_scores(mapped, rows, q), want, **tol)
    np.testing.assert_allclose(fi._exact_scores(mapped[10:], rows - 10, q), want, **tol)
    np.testing.assert_allclose(fi._exact_scores(x, rows, q), want, **tol)
    np.testing.assert_allclose(fi._exact_scores(x.astype(np.float32), rows, q), want, **tol)
    assert np.array_equal(fi._exact_scores(mapped, rows, q), fi._exact_scores(x, rows, q))
    for other in (x.astype(np.float64), x.astype(">f2"), x[::-1].copy()[::-1]):  # torch takes none of them
        assert np.array_equal(fi._exact_scores(other, rows, q), fi._exact_scores(x, rows, q))
    with pytest.raises(InputError, match="dimensions"):  # FAISS would read past a short query
        fi._exact_scores(mapped, rows, q[:50])


def test_rerank_scores_are_the_float32_sums_of_the_widened_rows(tmp_path):
    """The re-rank gathers and widens with torch in blocks; its scores must be, bit for bit, FAISS's float32
    dot products of the widened rows (those of the FAISS-only scorer before it), in every block."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, 384)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    q = rng.standard_normal(384).astype(np.float32)
    rows = np.unique(rng.integers(0, 2000, 1500))  # several blocks and a partial last one
    assert rows.size > 2 * fi._RERANK_BLOCK
    wide = np.ascontiguousarray(x[rows].astype(np.float32))
    want = np.empty(rows.size, dtype=np.float32)
    faiss.fvec_inner_products_ny(
        faiss.swig_ptr(want), faiss.swig_ptr(q), faiss.swig_ptr(wide), 384, rows.size
    )
    assert np.array_equal(fi._exact_scores(mapped, rows, q), want)
    assert fi._exact_scores(mapped, rows[:0], q).shape == (0,)


def test_a_large_rerank_is_split_over_threads_with_the_same_scores(tmp_path, monkeypatch):
    """From 2 x RERANK_ROWS_PER_THREAD rows up, the re-rank scores contiguous parts of the rows on the
    calling thread and the engine's re-rank threads; every row's score is the one thread's, bit for bit,
    whatever the number of threads; fewer rows stay on the calling thread."""
    import threading

    rng = np.random.default_rng(9)
    n = 4 * fi.RERANK_ROWS_PER_THREAD + 300
    x = rng.standard_normal((n + 500, 64)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    q = rng.standard_normal(64).astype(np.float32)
    rows = np.sort(rng.choice(n + 500, n, replace=False))
    seen = []
    score_rows = fi._score_rows

    def record(vectors, part, query, out):
        seen.append((threading.current_thread().name, part.size))
        score_rows(vectors, part, query, out)

    monkeypatch.setattr(fi, "_score_rows", record)
    one = fi._exact_scores(mapped, rows, q, threads=1)
    assert seen == [(threading.current_thread().name, n)]
    for threads in (2, 3, 8):
        seen.clear()
        assert np.array_equal(fi._exact_scores(mapped, rows, q, threads=threads), one)
        names = [name for name, _ in seen]
        assert len(seen) == min(threads, n // fi.RERANK_ROWS_PER_THREAD)
        assert names.count(threading.current_thread().name) == 1  # the first part (recorded in any order)
        assert sum(name.startswith("skyloc-rerank") for name in names) == len(seen) - 1
        assert sum(size for _, size in seen) == n
        assert sum(size % fi._RERANK_BLOCK != 0 for _, size in seen) <= 1  # whole blocks but the last part
    seen.clear()
    few = rows[: 2 * fi.RERANK_ROWS_PER_THREAD - 1]
    assert np.array_equal(fi._exact_scores(mapped, few, q, threads=2), one[: few.size])
    assert len(seen) == 1  # too few rows to pay for a second thread


def test_a_failing_part_of_a_split_rerank_raises_in_the_caller(tmp_path):
    """A part scored on a re-rank thread that fails (here: a row past the end) raises in the caller, after
    every part has finished; the pool keeps working."""
    rng = np.random.default_rng(10)
    n = 3 * fi.RERANK_ROWS_PER_THREAD
    x = rng.standard_normal((n, 32)).astype(np.float16)
    q = rng.standard_normal(32).astype(np.float32)
    rows = np.arange(n)
    bad = rows.copy()
    bad[-1] = n + 5  # in the last part, which a re-rank thread scores
    with pytest.raises((IndexError, RuntimeError)):
        fi._exact_scores(x, bad, q, threads=2)
    assert np.array_equal(fi._exact_scores(x, rows, q, threads=2), fi._exact_scores(x, rows, q, threads=1))


def test_faiss_is_imported_with_a_short_openmp_spin_and_the_environment_restored():
    """The engine sets GOMP_SPINCOUNT only while FAISS's libgomp loads (faiss_runtime): afterwards the
    variable is gone from the environment (torch's libgomp and child processes keep their defaults), and a
    value the user set is left alone."""
    import subprocess
    import sys

    code = (
        "import os, sys; from engine.retrieval import faiss_index; "
        "print('faiss' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "None"], out.stderr
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "GOMP_SPINCOUNT": "7"},
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["True", "7"], out.stderr


def test_the_rerank_runs_torch_on_the_calling_thread_only():
    """torch's threads would keep spinning after the re-rank and slow the next query's FAISS scan: inside
    the re-rank torch has one thread, on this thread only; torch's setting is the same before and after."""
    import threading

    torch = fi._torch()
    before = torch.get_num_threads()
    if fi._torch_openmp() is None or before < 2:
        pytest.skip("torch has no libgomp of its own here, or a single thread anyway")
    seen = {}
    with fi._torch_on_this_thread():
        seen["inside"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other thread", torch.get_num_threads()))
        other.start()
        other.join()
    assert seen == {"inside": 1, "other thread": before}
    assert torch.get_num_threads() == before


def test_a_warm_rerank_skips_the_prefetch_a_cold_one_does_not(tmp_path):
    """The page-cache check (mincore on a sample of the rows) says no for a file out of the cache and yes
    once its rows were read; the re-rank prefetches only in the first case."""
    if fi._mincore() is None:
        pytest.skip("no mincore on this platform")
    rng = np.random.default_rng(8)
    path = tmp_path / "v.npy"
    np.save(path, rng.standard_normal((4096, 1024)).astype(np.float16))  # 8 MiB, 2 KiB rows
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())  # clean pages can be dropped from the cache
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    mapped = np.load(path, mmap_mode="r")
    rows = np.unique(rng.integers(0, 4096, 300))
    if not Path("/proc/mounts").exists():
        pytest.skip("no /proc/mounts to tell the filesystem by")
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    fs = max((m for m in mounts if str(tmp_path).startswith(m[0])), key=lambda m: len(m[0]))[1]
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: its pages never leave memory")
    assert not fi._rows_resident(mapped, rows)
    fi._prefetch(mapped, rows)  # asks for the pages; reading the rows waits for them
    np.asarray(mapped[rows]).sum()
    assert fi._rows_resident(mapped, rows)
    assert not fi._rows_resident(mapped, np.array([], dtype=np.int64))


def test_the_best_candidates_are_kept_by_score_then_id():
    scores = np.array([0.9, 0.5, 0.5, 0.7, 0.5, 0.1, 0.5], dtype=np.float32)
    ids = np.array([40, 31, 12, -1, 7, 3, 50])
    # the best 3 of the 6 hits: 0.9 (id 40), then two of the four at 0.5: the smaller ids, 7 and 12
    assert fi._best_candidates(scores, ids, 3).tolist() == [7, 12, 40]
    assert fi._best_candidates(-scores, ids, 3, higher_is_better=False).tolist() == [7, 12, 40]
    assert fi._best_candidates(scores, ids, 10).tolist() == [3, 7, 12, 31, 40, 50]  # fewer hits than asked
    assert fi._best_candidates(scores, np.full(7, -1), 3).size == 0


def test_a_repeated_query_re_ranks_the_same_candidates_despite_tied_codes():
    """Many codes tie at the last candidate (here: every vector four times): the same query re-ranks the
    same rows and returns the same result every time, on every thread count."""
    rng = np.random.default_rng(12)
    base = rng.standard_normal((1500, 32)).astype(np.float32)
    x = np.repeat(base, 4, axis=0) + 0  # 6000 vectors, each tying with three others
    faiss.normalize_L2(x)
    index = fi.build(x, "IVF8,PQ8x4fsr+rerank")
    q = x[rng.choice(len(x), 8, replace=False)] + 0.05 * rng.standard_normal((8, 32)).astype(np.float32)
    seen = []
    rows_of = fi._best_candidates

    def record(scores, ids, n, higher_is_better=True):
        rows = rows_of(scores, ids, n, higher_is_better)
        seen.append(rows)
        return rows

    threads = faiss.omp_get_max_threads()
    try:
        fi._best_candidates = record
        results = []
        for t in (1, *[2] * 12):
            faiss.omp_set_num_threads(t)
            for i in range(len(q)):  # single queries: FAISS splits each one's lists over its threads
                results.append((i, fi.search(index, q[i], 10, rerank=301, nprobe=8)))
    finally:
        fi._best_candidates = rows_of
        faiss.omp_set_num_threads(threads)
    for j, (i, (s, ids)) in enumerate(results):
        s0, ids0 = results[i][1]
        assert np.array_equal(ids, ids0) and np.array_equal(s, s0)
        assert seen[j].size == 301 and np.array_equal(seen[j], seen[i])


def test_a_single_query_splits_its_lists_over_the_threads():
    """Fewer queries than threads: the fast-scan IVF works list by list on every thread (FAISS implem 15);
    a batch keeps FAISS's per-query split. Both give the same candidates."""
    x, q, _ = world(2_000, 64, 16, seed=3)
    index = fi.build(x, "IVF32,PQ16x4fsr+rerank")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.base))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        singles = [fi.search(index, q[i], 20, nprobe=32)[1][0] for i in range(len(q))]
        assert ivf.implem == fi.FAST_SCAN_BY_LIST
        _, batch = fi.search(index, q, 20, nprobe=32)
        assert ivf.implem == fi.FAST_SCAN_BY_QUERY
    finally:
        faiss.omp_set_num_threads(threads)
    assert np.mean([np.isin(a, b).mean() for a, b in zip(singles, batch, strict=True)]) >= 0.99


def test_a_pca_in_front_of_the_codes_keeps_no_mean(tmp_path):
    """FAISS's PCA subtracts the training mean from vectors and queries, which ranks candidates by
    (q - m).(x - m) instead of q.x; descriptors share a large mean, so build() keeps the PCA uncentred
    (faiss_index._train). Its candidates must rank as the codes of the vectors themselves do, and the
    uncentred transform must survive writing and reading."""
    x, q, _ = world(4000, 64, 200)
    _, truth = fi.search(fi.build(x, "Flat"), q, 10)
    factory = "PCAR60,IVF16,PQ30x4fsr"
    index = fi.build(x, factory + "+rerank")
    pca = faiss.downcast_VectorTransform(faiss.downcast_index(index.base).chain.at(0))
    assert isinstance(pca, faiss.PCAMatrix)
    assert not faiss.vector_to_array(pca.mean).any() and not faiss.vector_to_array(pca.b).any()
    np.testing.assert_allclose(
        pca.apply(x[:5]), x[:5] @ faiss.vector_to_array(pca.A).reshape(60, 64).T, atol=1e-5
    )

    fi.write_index(index, tmp_path / "i.faiss")
    reopened = fi.read_index(tmp_path / "i.faiss")
    pca2 = faiss.downcast_VectorTransform(faiss.downcast_index(reopened.base).chain.at(0))
    assert not faiss.vector_to_array(pca2.b).any()
    assert np.array_equal(reopened.base.search(q, 50)[1], index.base.search(q, 50)[1])

    def found(cand_index: faiss.Index) -> float:  # share of the exact top-10 among 50 candidates
        faiss.extract_index_ivf(cand_index).nprobe = 16
        _, cand = cand_index.search(q, 50)
        return float(np.mean([np.isin(t, c).mean() for t, c in zip(truth, cand, strict=True)]))

    centred = fi.make_index(64, factory)  # what FAISS's own training gives
    centred.train(x)
    centred.add(x)
    no_pca = fi.build(x, "IVF16,PQ32x4fsr")
    got, got_centred, got_no_pca = found(index.base), found(centred), found(no_pca)
    # measured: 0.81 uncentred, 0.31 centred, 0.83 without the PCA
    assert got >= got_no_pca - 0.05 and got > got_centred + 0.3, (got, got_centred, got_no_pca)


def test_a_balanced_pca_ranks_short_codes_better_than_a_rotated_one(tmp_path):
    """PCAB{d'} deals the PCA's axes out to the PQ's sub-quantizers (equal variance each, no random rotation),
    so that 4-bit codes of several dims spend their centroids on the strong axes (faiss_index.BALANCED_PCA).
    On descriptors with the real power-law spectrum its candidates must beat a randomly rotated PCA's at the
    same code size (measured at 128-d: 0.85 vs 0.73 with 4 dims a code, 0.71 vs 0.57 with 6; equal, 0.99 and
    0.975, with 2), and the balanced order must be in the written index (it lives in the PCA's matrix)."""
    x, q, _ = world(5_000, 128, 200)
    _, truth = fi.search(fi.build(x, "Flat"), q, 10)

    def found(factory: str) -> float:  # share of the exact top-10 among 100 candidates, every list probed
        index = fi.build(x, factory, seed=0)
        _, cand = fi.search(index, q, 100, nprobe=16)
        if factory.startswith("PCAB"):
            fi.write_index(index, tmp_path / "b.faiss")
            assert np.array_equal(fi.search(fi.read_index(tmp_path / "b.faiss"), q, 100, nprobe=16)[1], cand)
        return float(np.mean([np.isin(t, c).mean() for t, c in zip(truth, cand, strict=True)]))

    for m, gain in ((30, 0.08), (20, 0.08), (60, -0.02)):
        balanced, rotated = found(f"PCAB120,IVF16,PQ{m}x4fsr"), found(f"PCAR120,IVF16,PQ{m}x4fsr")
        assert balanced > rotated + gain, (m, balanced, rotated)

    index = fi.make_index(128, "PCAB120,IVF16,PQ20x4fsr")
    pca = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    assert isinstance(pca, faiss.PCAMatrix) and pca.balanced_bins == 20 and not pca.random_rotation
    with pytest.raises(InputError, match="PQ stage"):
        fi.make_index(128, "PCAB120,IVF16,SQ8")
    with pytest.raises(InputError, match="must come first"):
        fi.make_index(128, "IVF16,PCAB120,PQ20")
    with pytest.raises(InputError, match="at most"):
        fi.make_index(128, "PCAB100000000,IVF16,PQ20")


def test_the_stated_rerank_default_is_the_engines(capsys):
    """The CLI help and the HTTP schema state the default re-rank count as a literal (the CLI does not import
    FAISS to build its parser): they must say what the engine does (they said 2000 after it became 1000, then
    1000 for every index)."""
    from engine.cli import build_parser
    from engine.service.schemas import FootprintRequest, LocalizeRequest

    stated = (
        f"default: the index's, {fi.DEFAULT_RERANK} for 2-bit codes, {fi.SHORT_CODE_RERANK} for the preset's "
        f"1-bit codes from {fi.SHORT_CODES_MIN_VECTORS // 1000}k vectors up, {fi.COARSE_CODE_RERANK} for its "
        f"half-bit codes from {fi.HALF_BIT_CODES_MIN_VECTORS // 1_000_000}M up"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["localize", "--help"])
    assert stated in " ".join(capsys.readouterr().out.split())
    for schema in (LocalizeRequest, FootprintRequest):
        assert stated in schema.model_fields["rerank"].description


def test_a_balanced_pca_wraps_a_refined_index(tmp_path):
    """``PCAB{d'},IVF..,PQ..x4fsr,Refine(PQ..x8)``: the PCA goes around the whole refined index (FAISS's own
    parser would put it inside the base and refine the raw vectors), the refinement re-scores REFINE_K_FACTOR
    x k of the fast-scan codes' candidates with finer 8-bit codes of the same balanced sub-spaces, and that
    factor is in the written file. The refined candidates must hold more of the exact top-10 than the scan's
    own (same codes, same lists): measured 0.645 vs 0.43 (and 0.43 with FAISS's k_factor 1)."""
    x, q, _ = world(5_000, 128, 200)
    _, truth = fi.search(fi.build(x, "Flat"), q, 10)
    refined = fi.build(x, "PCAB120,IVF16,PQ15x4fsr,Refine(PQ15x8)+rerank", seed=0)
    outer = faiss.downcast_index(refined.base)
    assert isinstance(outer, faiss.IndexPreTransform)
    inner = faiss.downcast_index(outer.index)
    assert isinstance(inner, faiss.IndexRefine) and inner.k_factor == fi.REFINE_K_FACTOR
    assert faiss.downcast_index(inner.refine_index).d == 120
    # the candidates it hands over are ranked by the refinement's codes (8 dims an 8-bit code), not the
    # scan's (8 dims a 4-bit code, which alone would get COARSE_CODE_RERANK)
    assert refined.rerank == fi.SHORT_CODE_RERANK
    fi.write_index(refined, tmp_path / FAISS_FILE)
    reread = fi.read_index(tmp_path / FAISS_FILE)
    assert faiss.downcast_index(faiss.downcast_index(reread.base).index).k_factor == fi.REFINE_K_FACTOR

    def found(index) -> float:  # share of the exact top-10 among 40 candidates, every list probed
        _, cand = fi.search(index, q, 40, nprobe=16)
        return float(np.mean([np.isin(t, c).mean() for t, c in zip(truth, cand, strict=True)]))

    scan_only = fi.build(x, "PCAB120,IVF16,PQ15x4fsr", seed=0)
    assert found(outer) > found(scan_only) + 0.1, (found(outer), found(scan_only))
    assert np.array_equal(fi.search(reread.base, q, 40, nprobe=16)[1], fi.search(outer, q, 40, nprobe=16)[1])
