"""engine.retrieval.faiss_index: exactness, id filters, per-call knobs, training checks and atomic files."""

from __future__ import annotations

import os
import threading

import faiss
import numpy as np
import pytest

from engine.errors import CancelledError, IndexNotFoundError, InputError
from engine.progress import CancelToken
from engine.retrieval import faiss_index as fi

DIM = 32


def clustered(n: int, d: int = DIM, clusters: int = 32, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """L2-normalised points around random unit centres (float32, C order)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def near_queries(x: np.ndarray, nq: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), nq, replace=False)] + 0.05 * rng.standard_normal((nq, x.shape[1])).astype(
        np.float32
    )
    faiss.normalize_L2(q)
    return q


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """These indexes are tiny: OpenMP threads only spin against other processes on a shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(10_000)  # >= 39 x 256 points: enough to train 8-bit PQ/OPQ
    return x, near_queries(x, 20)


@pytest.fixture(scope="module")
def built(data):
    """Indexes over ``data`` built once per factory (k-means / HNSW construction is the slow part)."""
    cache: dict[str, faiss.Index] = {}

    def get(factory: str) -> faiss.Index:
        if factory not in cache:
            cache[factory] = quick_opq_index(data[0]) if factory == "OPQ" else fi.build(data[0], factory)
        return cache[factory]

    return get


def quick_opq_index(x: np.ndarray) -> faiss.Index:
    """A real OPQ-wrapped IVF-PQ (IndexPreTransform) with few OPQ iterations: the default 50 take ~15 s."""
    index = fi.make_index(x.shape[1], "OPQ8_32,IVF16,PQ8x4")
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter, opq.niter_pq_0 = 2, 2
    index.train(x)
    fi.add_vectors(index, x)
    return index


# ------------------------------------------------------------------------------------------- exactness


def test_flat_search_equals_numpy_brute_force(data):
    x, q = data
    index = fi.build(x, "Flat")
    scores, ids = fi.search(index, q, 10)
    ref_scores, ref_ids = brute_force(x, q, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (20, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_single_query_vector_and_k_beyond_ntotal(data):
    x, q = data
    index = fi.build(x[:5], "Flat")
    scores, ids = fi.search(index, q[0], 8)
    assert ids.shape == (1, 8)
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]
    assert (ids[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()


def test_query_dimension_mismatch_is_input_error(data):
    x, _ = data
    index = fi.build(x, "Flat")
    with pytest.raises(InputError, match="dimension"):
        fi.search(index, np.ones((2, DIM + 1), np.float32), 5)
    with pytest.raises(InputError):
        fi.search(index, x[:2], 0)


# -------------------------------------------------------------------------------------------- filters


def test_allowed_ids_flat_equals_brute_force_over_subset(data):
    x, q = data
    allowed = np.sort(np.random.default_rng(3).choice(len(x), 300, replace=False))
    index = fi.build(x, "Flat")
    scores, ids = fi.search(index, q, 10, allowed_ids=allowed)
    ref_scores, ref_pos = brute_force(x[allowed], q, 10)
    np.testing.assert_array_equal(ids, allowed[ref_pos])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


FILTERED_FACTORIES = [
    "IVF16,Flat",
    "IVF16,SQ8",
    "IVF16,PQ8x4",
    "HNSW16",
    "PCA16,IVF16,Flat",
    "IDMap,Flat",
    "OPQ",
]


@pytest.mark.parametrize("factory", FILTERED_FACTORIES)
@pytest.mark.parametrize("n_allowed", [60, 1500])
def test_allowed_ids_restricts_every_index_type(data, built, factory, n_allowed):
    x, q = data
    allowed = np.random.default_rng(4).choice(len(x), n_allowed, replace=False)
    index = built(factory)
    _, ids = fi.search(index, q, 10, allowed_ids=allowed)
    assert np.isin(ids[ids >= 0], allowed).all()
    # the filter widens nprobe / efSearch, so a filtered search still fills its top-k
    assert (ids >= 0).mean() > 0.95
    _, truth = brute_force(x[allowed], q, 10)
    compressed = "PQ" in factory or "PCA" in factory  # recall limited by the codes, not by the filter
    assert recall(ids, allowed[truth]) > (0.2 if compressed else 0.9)


def test_filter_smaller_than_k_pads_with_minus_one(data, built):
    x, q = data
    index = built("IVF16,Flat")
    allowed = np.array([5, 17, 123])
    scores, ids = fi.search(index, q[:3], 5, allowed_ids=allowed)
    for row, srow in zip(ids, scores, strict=True):
        assert sorted(row[:3]) == [5, 17, 123]
        assert (row[3:] == -1).all() and np.isneginf(srow[3:]).all()


def test_empty_and_negative_allowed_ids(data):
    x, q = data
    index = fi.build(x, "Flat")
    scores, ids = fi.search(index, q, 4, allowed_ids=np.array([], dtype=np.int64))
    assert (ids == -1).all() and np.isneginf(scores).all()
    with pytest.raises(InputError):
        fi.search(index, q, 4, allowed_ids=np.array([-3, 1]))


def test_idmap_filters_on_external_ids(data):
    x, q = data
    ext = np.arange(len(x), dtype=np.int64) * 1_000_003 + 7  # sparse 64-bit ids
    index = fi.build(x, "IDMap,Flat", ids=ext)
    allowed = ext[::10]
    _, ids = fi.search(index, q, 5, allowed_ids=allowed)
    _, truth = brute_force(x[::10], q, 5)
    np.testing.assert_array_equal(ids, allowed[truth])


# ----------------------------------------------------------------------------------------- per-call knobs


def test_nprobe_recall_is_monotonic_and_exact_at_nlist():
    x = clustered(6000, clusters=16, noise=1.0, seed=5)  # clusters overlap: neighbours spread over lists
    q = near_queries(x, 40, seed=6)
    _, truth = brute_force(x, q, 20)
    index = fi.build(x, "IVF64,Flat")
    before = faiss.extract_index_ivf(index).nprobe
    recalls = [recall(fi.search(index, q, 20, nprobe=p)[1], truth) for p in (1, 2, 4, 8, 16, 64)]
    assert all(a <= b + 1e-12 for a, b in zip(recalls, recalls[1:], strict=False)), recalls
    assert recalls[0] < 0.9 and recalls[-1] == 1.0, recalls
    assert faiss.extract_index_ivf(index).nprobe == before  # per call, the index is not mutated


def test_ef_search_per_call(data, built):
    x, q = data
    _, truth = brute_force(x, q, 10)
    hnsw = built("HNSW16")
    before = hnsw.hnsw.efSearch
    low, high = (recall(fi.search(hnsw, q, 10, ef_search=e)[1], truth) for e in (10, 200))
    assert high >= low and high > 0.9
    assert hnsw.hnsw.efSearch == before


def test_nprobe_reaches_ivf_inside_opq_wrapper(built):
    q = clustered(20, seed=11)  # off-cluster queries: their neighbours lie in several lists
    index = built("OPQ")  # IndexPreTransform: params go through SearchParametersPreTransform
    assert isinstance(index, faiss.IndexPreTransform)
    ivf = faiss.extract_index_ivf(index)
    results = {}
    for p in (1, 16):
        results[p] = fi.search(index, q, 10, nprobe=p)[1]
        saved, ivf.nprobe = ivf.nprobe, p  # the same search with the knob set on the index itself
        np.testing.assert_array_equal(results[p], index.search(q, 10)[1])
        ivf.nprobe = saved
    assert not np.array_equal(results[1], results[16])


def test_concurrent_searches_with_different_nprobe(data, built):
    x, q = data
    index = built("IVF16,Flat")
    expected = {p: fi.search(index, q, 10, nprobe=p)[1] for p in (1, 16)}
    errors: list[str] = []

    def worker(p: int) -> None:
        for _ in range(20):
            if not np.array_equal(fi.search(index, q, 10, nprobe=p)[1], expected[p]):
                errors.append(f"nprobe={p}")

    threads = [threading.Thread(target=worker, args=(p,)) for p in (1, 16, 1, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ----------------------------------------------------------------------------------- factories, training


@pytest.mark.parametrize("factory", ["IVFx,Flat", "PQ7", "", "Fla t", "auto"])
def test_bad_factory_is_input_error(factory):
    with pytest.raises(InputError) as err:
        fi.make_index(DIM, factory)
    assert "Flat" in err.value.message


def test_too_small_training_set_is_input_error(data):
    x, _ = data
    with pytest.raises(InputError, match=r"2,496 training vectors.*'Flat'"):
        fi.build(x[:500], "IVF64,Flat")
    with pytest.raises(InputError, match="9,984"):  # 8-bit PQ: 39 x 256 points per sub-quantizer
        fi.build(x[:5000], "IVF16,PQ8")
    with pytest.raises(InputError, match="train_size"):
        fi.build(x, "IVF64,Flat", train_size=1000)


def test_min_train_size_and_suggest_factory():
    assert fi.min_train_size(fi.make_index(DIM, "Flat")) == 0
    assert fi.min_train_size(fi.make_index(DIM, "IVF100,Flat")) == 3900
    assert fi.min_train_size(fi.make_index(DIM, "OPQ8_32,IVF16,PQ8")) == 39 * 256
    assert fi.suggest_factory(150_000, 2048) == "Flat"
    # from FLAT_MAX_VECTORS up: the compressed preset (tests/test_compressed_index.py)
    assert fi.suggest_factory(1_000_000, 2048) == "PCAB1920,IVF1024,PQ480x4fsr+rerank"
    assert fi.suggest_factory(4_000_000, 2048) == "PCAB1920,IVF2048,PQ240x4fsr+rerank"
    assert fi.suggest_factory(100_000_000, 96) == "PCAB88,IVF8192,PQ22x4fsr+rerank"  # 4 dims a code
    assert fi.suggest_factory(1_000_000, 15) == "IVF1024,PQ5x4fsr+rerank"  # no PCA below 16-d; m divides
    for n in (200_000, 1_000_000, 4_000_000, 40_000_000):
        factory = fi.suggest_factory(n, 2048)
        fi.make_index(2048, factory)  # a valid factory
        nlist = fi.declared_nlist(factory)
        assert nlist * fi.POINTS_PER_CENTROID <= n


def test_auto_builds_flat_for_small_database(data):
    x, _ = data
    index = fi.build(x, "auto")
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def test_build_progress_and_cancel(data):
    x, _ = data
    seen: list[float] = []
    fi.build(x, "IVF16,Flat", progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        fi.build(x, "Flat", cancel=token)


def test_build_sets_useful_default_nprobe():
    x = clustered(64 * 39 * 2, seed=8)
    index = fi.build(x, "IVF128,Flat")
    assert faiss.extract_index_ivf(index).nprobe == 8  # nlist / 16, not FAISS's 1


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW16", "PCA16,IVF16,Flat", "OPQ"])
def test_write_read_round_trip_and_mmap(tmp_path, data, built, factory):
    x, q = data
    index = built(factory)
    path = fi.write_index(index, tmp_path / "db.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.faiss"]  # no temp file left
    assert fi.index_nbytes(index) == path.stat().st_size == len(faiss.serialize_index(index))
    assert fi.index_nbytes(index, path) == path.stat().st_size
    expected = fi.search(index, q, 10)
    for mmap in (False, True):
        back = fi.read_index(path, mmap=mmap)
        got = fi.search(back, q, 10)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0])
    with pytest.raises(InputError, match="mmap"):  # FAISS would abort the process
        fi.add_vectors(back, x[:2])


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, data, monkeypatch):
    x, _ = data
    path = tmp_path / "db.faiss"
    fi.write_index(fi.build(x[:100], "Flat"), path)
    good = path.read_bytes()

    real_write = fi.faiss.write_index

    def broken_write(index, writer):
        real_write(fi.build(x[:3], "Flat"), writer)  # some bytes reach the temp file, then FAISS fails
        raise RuntimeError("Error in write at x.cpp:1: Error: disk full")

    monkeypatch.setattr(fi.faiss, "write_index", broken_write)
    with pytest.raises(InputError, match="disk full"):
        fi.write_index(fi.build(x, "Flat"), path)
    assert path.read_bytes() == good
    with pytest.raises(InputError):
        fi.write_index(fi.build(x[:10], "Flat"), tmp_path / "new.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.faiss"]
    monkeypatch.undo()
    with pytest.raises(InputError, match="does not exist"):  # parent is a file, not a folder
        fi.write_index(fi.build(x[:10], "Flat"), tmp_path / "db.faiss" / "x.faiss")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_write_into_read_only_folder_is_input_error(tmp_path, data):
    x, _ = data
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError):
            fi.write_index(fi.build(x[:10], "Flat"), folder / "db.faiss")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_read_missing_or_corrupt_index(tmp_path):
    with pytest.raises(IndexNotFoundError):
        fi.read_index(tmp_path / "none.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index at all")
    with pytest.raises(InputError, match="not a readable FAISS index"):
        fi.read_index(bad)
