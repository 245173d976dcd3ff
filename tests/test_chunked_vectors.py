"""A build's descriptors read from its chunk files (engine/retrieval/chunked.py), never all in RAM."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from engine.errors import InputError
from engine.retrieval import faiss_index as fi
from engine.retrieval.chunked import ChunkedVectors


def chunks(tmp_path, sizes: list[int], dim: int, seed: int = 0) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(seed)
    whole = rng.standard_normal((sum(sizes), dim)).astype(np.float32)
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    paths, start = [], 0
    for i, size in enumerate(sizes):
        p = tmp_path / f"{i:03d}.npy"
        np.save(p, whole[start : start + size])
        paths.append(p)
        start += size
    return paths, whole


def test_reads_equal_the_concatenated_array(tmp_path):
    paths, whole = chunks(tmp_path, [5, 1, 7, 3], 6)
    a = ChunkedVectors(paths)
    assert a.shape == whole.shape and len(a) == 16 and a.dtype == np.float32 and a.ndim == 2
    for sl in (
        slice(0, 16),
        slice(3, 9),
        slice(5, 6),
        slice(6, 13),
        slice(12, None),
        slice(-4, None),
        slice(9, 2),
    ):
        np.testing.assert_array_equal(a[sl], whole[sl])
    rows = np.array([15, 0, 5, 5, 6, 12, -1, 4])
    np.testing.assert_array_equal(a[rows], whole[rows])
    np.testing.assert_array_equal(a[np.array([], dtype=np.int64)], whole[[]])
    with pytest.raises(TypeError, match="every row into memory"):
        np.asarray(a)
    with pytest.raises(IndexError):
        a[np.array([16])]
    with pytest.raises(IndexError):
        a[::2]


def test_bad_chunks_are_refused(tmp_path):
    paths, _ = chunks(tmp_path, [4, 4], 6)
    np.save(tmp_path / "f64.npy", np.zeros((3, 6)))
    np.save(tmp_path / "d5.npy", np.zeros((3, 5), dtype=np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not float32"):
        ChunkedVectors([*paths, tmp_path / "f64.npy"])
    with pytest.raises(InputError, match="5-d"):
        ChunkedVectors([*paths, tmp_path / "d5.npy"])
    with pytest.raises(InputError, match="unreadable"):
        ChunkedVectors([tmp_path / "junk.npy"])
    with pytest.raises(InputError):
        ChunkedVectors([])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4fsr+rerank"])
def test_an_index_built_from_chunks_equals_one_built_from_the_array(tmp_path, factory):
    paths, whole = chunks(tmp_path, [700] * 5 + [123], 32)
    from_chunks = fi.build(ChunkedVectors(paths), factory)
    from_array = fi.build(whole, factory)
    q = whole[::97] + 0.01
    s1, i1 = fi.search(from_chunks, q, 20)
    s2, i2 = fi.search(from_array, q, 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    fi.write_index(from_chunks, tmp_path / "a.faiss")
    fi.write_index(from_array, tmp_path / "b.faiss")
    if factory.endswith("+rerank"):
        np.testing.assert_array_equal(
            np.load(fi.rerank_file(tmp_path / "a.faiss")), np.load(fi.rerank_file(tmp_path / "b.faiss"))
        )


def test_a_compressed_build_from_chunks_never_holds_the_descriptors(tmp_path, monkeypatch):
    """A compressed build reads the descriptors in slices: numpy's peak allocation stays a fraction of them.

    The slice size (256 MiB in production) is lowered so that 64 MB of descriptors span many slices;
    with a concatenated array (what the build used to assemble) the peak would be at least 64 MB.
    """
    monkeypatch.setattr(fi, "_CHUNK_BYTES", 4 << 20)
    paths, whole = chunks(tmp_path, [2000] * 32, 256)
    total = whole.nbytes
    del whole
    vectors = ChunkedVectors(paths)
    tracemalloc.start()
    try:
        index = fi.build(vectors, "IVF64,PQ64x4fsr+rerank", train_size=4000)
        fi.write_index(index, tmp_path / "index.faiss")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.ntotal == 64_000
    assert peak < total / 4, f"numpy peak {peak / 1e6:.1f} MB for {total / 1e6:.1f} MB of descriptors"
