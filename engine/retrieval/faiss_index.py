"""Vector-search layer: FAISS indexes over L2-normalised descriptors, scored by inner product (= cosine).

Retrieval logic (rotation dedup, area filters as id sets) lives above this module; here we only build, store
and search indexes, so that the choice of index is one factory string and every index type is searched the
same way. Ids are positions in the array given to :func:`build` (0 .. n-1), unless the factory says ``IDMap``.

Index choice. Figures from ``bench/search_scale.py`` (2 cores, faiss 1.15, 1M x 2048-d synthetic "manifold"
descriptors, 1000 queries, recall@100 = share of the exact top-100 found; bench_out/search_scale_1M.txt):

=========================  =====  ==========  ==========  ===========  ==============================
factory (nprobe)           MB     ms/q batch  ms single   recall@100   note
=========================  =====  ==========  ==========  ===========  ==============================
Flat                       8192   14.0        633         1.000        exact; single query = 8 GB scan
IVF4096,SQ8 (64 / 256)     2090   3.1 / 12    7.8 / 26    0.74 / 0.93  4x smaller, 24-80x faster
IVF4096,PQ256 (64 / 256)   300    1.2 / 4.0   3.5 / 9.8   0.58 / 0.60  27x smaller; PQ-limited
IVF4096,PQ64 (64)          108    0.33        1.9         0.36         76x smaller
PCAR256,IVF4096,PQ64 (64)  95     0.20        0.66        0.65         data-dependent (see bench)
=========================  =====  ==========  ==========  ===========  ==============================

In every row the query's exact top-1 stayed in the top-100 (R1@100 = 1.0). ``HNSW32`` (50k: recall 0.97 at
efSearch 128, 1.3 ms single) is larger than Flat (graph + full vectors), so it does not help where memory
is the limit. ``OPQ{m}_{d'},...`` trains 50 OPQ iterations (minutes at 2048-d); ``PCAR{d'}`` is the cheap
rotation + reduction, and how much either loses depends on the descriptors' spectrum: run the benchmark on
real descriptors (``--real``) before choosing one. ``IVF{nlist},Flat`` is as big as Flat, only faster.

Search parameters (nprobe, efSearch, id filter) are passed per call as ``faiss.SearchParameters`` objects,
never by mutating the index, so concurrent searches on one index are safe (FAISS releases the GIL). The one
field a search sets is how a fast-scan IVF splits its work over threads (:func:`_pick_fast_scan_strategy`),
which FAISS takes no per-call parameter for: it changes speed, never results.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import IndexNotFoundError, InputError, from_os_error
from ..progress import CancelToken, ProgressFn, no_progress
from .chunked import ChunkedVectors
from .faiss_runtime import faiss  # FAISS, its idle OpenMP threads sleeping sooner (see there)

__all__ = [
    "COMPRESSED",
    "FACTORY_EXAMPLES",
    "FLAT_MAX_VECTORS",
    "RERANK_SUFFIX",
    "RerankIndex",
    "add_vectors",
    "build",
    "check_buildable",
    "compressed_factory",
    "index_nbytes",
    "make_index",
    "min_train_size",
    "read_index",
    "rerank_file",
    "search",
    "suggest_factory",
    "write_index",
]

#: Factory strings worth knowing (``nlist`` ~ 4 sqrt(N) rounded to a power of two; ``m`` divides the dim).
FACTORY_EXAMPLES = (
    "Flat",
    "IVF4096,Flat",
    "IVF4096,SQ8",
    "IVF4096,PQ256",
    "OPQ64_256,IVF4096,PQ64",
    "HNSW32",
)

#: Below this many vectors, :func:`suggest_factory` says "Flat": exact search over 200k x 2048-d is a 1.6 GB
#: scan, ~0.13 s per single query on 2 cores (633 ms at 1M), and needs no training.
FLAT_MAX_VECTORS = 200_000

#: Up to this many bytes of SQ8 codes (n x dim: 2M vectors at 2048-d), :func:`suggest_factory` prefers
#: IVF + SQ8 (4x smaller than Flat, recall@100 0.93 at nprobe = nlist/16) to IVF + PQ (27x smaller, but
#: recall@100 ~0.6 whatever nprobe).
SQ8_MAX_BYTES = 4 << 30

#: k-means wants at least this many training points per centroid (FAISS warns below it).
POINTS_PER_CENTROID = 39

#: Defaults written into an index by :func:`build` (FAISS's own defaults, nprobe=1 and efSearch=16, give
#: poor recall@100). A per-call ``nprobe`` / ``ef_search`` overrides them.
DEFAULT_NPROBE_FRACTION = 1 / 16  # nprobe = nlist / 16 (256 for IVF4096: SQ8 recall@100 0.93 vs 0.74 at 64)
DEFAULT_EF_SEARCH = 128
#: ``...,Refine(X)`` indexes re-score this many times k candidates of their base with their X codes.
REFINE_K_FACTOR = 4

#: Upper bounds on what a factory string makes FAISS allocate when the index is made or filled. FAISS
#: allocates IVF lists (and PQ codebooks, HNSW links) up front, with no check: ``IVF1000000000,Flat`` is
#: std::bad_alloc, or the kernel's OOM killer, before any Python code can say why. The bounds are far
#: above any sensible index (suggest_factory stops at IVF65536; FAISS's billion-scale examples use 2^20).
MAX_NLIST = 1 << 20
MAX_GRAPH_DEGREE = 512  # HNSW{M} / NSG{R}: links per vector and level
MAX_CODE_BITS = 16  # PQ{m}x{nbits} ...: a 2^nbits-entry codebook per sub-quantizer
MAX_OUT_DIM = 1 << 16  # PCA{d} / OPQ{m}_{d} / RR{d}: a d x dim matrix

# Rows per add() chunk: 256 MiB of float32, whatever the dim.
_CHUNK_BYTES = 1 << 28

# Indexes read with mmap=True: their storage is a read-only view of the file, and FAISS *aborts the process*
# (C++ assertion, no Python exception) on add() to them, so add_vectors() refuses them.
_READ_ONLY: weakref.WeakSet = weakref.WeakSet()


# --------------------------------------------------------------------------------------------- creation


def _faiss_reason(exc: BaseException) -> str:
    """The useful part of a FAISS C++ exception text (drops the function signature and source location)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = re.search(r"\bat \S+:\d+: (?:Error: )?(.*)$", text)
    return m.group(1) if m else text


def declared_nlist(factory: str) -> int:
    """Inverted lists a factory string asks for (IVF{n}, IMI{k}x{b} = 2^(k*b)); 0 without an IVF stage."""
    nlist = 0
    for m in re.finditer(r"IVF(\d+)", factory):
        nlist = max(nlist, int(m.group(1)))
    for m in re.finditer(r"IMI(\d+)x(\d+)", factory):
        k, bits = int(m.group(1)), int(m.group(2))
        nlist = max(nlist, MAX_NLIST + 1 if k * bits > 62 else 1 << (k * bits))
    return nlist


def _check_factory_sizes(dim: int, factory: str) -> None:
    """Refuse sizes that FAISS would try to allocate whole (see MAX_NLIST) with a readable InputError."""
    problems = []
    nlist = declared_nlist(factory)
    if nlist > MAX_NLIST:
        problems.append(f"{nlist:,} inverted lists (at most {MAX_NLIST:,})")
    for m in re.finditer(r"(?:HNSW|NSG)(\d+)", factory):
        if int(m.group(1)) > MAX_GRAPH_DEGREE:
            problems.append(f"graph degree {int(m.group(1)):,} (at most {MAX_GRAPH_DEGREE})")
    for m in re.finditer(r"(?:PQ|RQ|LSQ)\d+((?:x\d+)+)", factory):
        nbits = int(m.group(1).rsplit("x", 1)[1])
        if nbits > MAX_CODE_BITS:
            problems.append(f"{nbits}-bit codes (at most {MAX_CODE_BITS})")
    for m in re.finditer(r"(?:PCA[WRB]*|OPQ\d+_|RR|ITQ)(\d+)", factory):
        if int(m.group(1)) > MAX_OUT_DIM:
            problems.append(f"a {int(m.group(1)):,}-d transform (at most {MAX_OUT_DIM:,})")
    if problems:
        raise InputError(
            f"index factory {factory!r} asks for {', '.join(problems)}: more memory than any index of "
            f"{dim}-d vectors needs. Examples that work: {', '.join(FACTORY_EXAMPLES)}; 'auto' picks one "
            "for the database size"
        )


#: ``PCAB{d'}`` (Skyloc's token; FAISS's factory has none): an uncentred PCA to d' dims (see :func:`_train`)
#: whose axes are dealt out to the sub-quantizers of the PQ that follows so that each holds an equal share of
#: the variance (FAISS's ``PCAMatrix.balanced_bins``, greedy by eigenvalue), with no random rotation. Each
#: 4-bit sub-quantizer then sees one strong axis and weaker ones, and its k-means spends its 16 centroids
#: mostly along the strong one: the bits go where the variance is. A random rotation (``PCAR``) instead makes
#: every sub-space isotropic and spreads the bits evenly over axes whose variances differ by 1000x (power-law
#: spectra). Measured (100k x 2048-d photo-like synthetic vectors, IVF256, 1000 candidates re-ranked, nprobe
#: 160): recall@100 0.9971 with ``PCAB1920,...,PQ480x4fsr`` (240 B a vector) vs 0.9708 with
#: ``PCAR1920,...,PQ480x4fsr``, and 0.9978 with ``PCAR1920,...,PQ960x4fsr`` (480 B, the preset's codes in
#: sessions 23-25). The short codes lose more as the database grows denser, so they get more candidates
#: (``SHORT_CODE_RERANK``): at 1M (IVF1024, nprobe 640; bench/results/index_scale.txt) PQ480 needs 3000 for
#: 0.997, and is then as fast (34 vs 33 ms a single query) as 2-bit PCAR codes with 1000, from half the RAM;
#: PQ320 (160 B, a scratch run) gets 0.977 from 1000. At 4M ``PCAB1920,IVF2048,PQ480x4fsr+rerank`` with 3000
#: candidates gives 0.996 and every exact top-1 in 61 ms a single query from 1.05 GB of RAM, against 2-bit
#: PCAR codes' 0.997 in 103 ms from 2.02 GB. The ``compressed`` preset from ``SHORT_CODES_MIN_VECTORS`` up.
BALANCED_PCA = "PCAB"
_BALANCED_PCA_RE = re.compile(rf"^{BALANCED_PCA}(\d+),")


def _balanced_pca_index(dim: int, factory: str) -> faiss.Index:
    """The index of a ``PCAB{d'},<rest>`` string: the PCA around the index that ``<rest>`` makes for d'-d
    vectors, its axes dealt out to the first PQ's sub-quantizers (FAISS applies that when the PCA is
    trained; the order is stored in the matrix). Made by hand rather than as FAISS's ``PCA{d'},<rest>``:
    FAISS parses a trailing ``,Refine(...)`` first and would put the PCA inside the refined index, leaving
    the refinement codes on the raw vectors."""
    m = _BALANCED_PCA_RE.match(factory)
    if not m:
        raise InputError(
            f"index factory {factory!r}: {BALANCED_PCA}{{d}} must come first, as in "
            f"'{BALANCED_PCA}240,IVF1024,PQ60x4fsr' (it balances the PCA over the PQ that follows)"
        )
    d_out = int(m.group(1))
    if not 0 < d_out <= dim:
        raise InputError(f"index factory {factory!r}: {BALANCED_PCA}{d_out} needs 1 to {dim} dims")
    inner = faiss.index_factory(d_out, factory[m.end() :], faiss.METRIC_INNER_PRODUCT)
    pq = _first_pq(inner)
    if pq is None:
        raise InputError(
            f"index factory {factory!r}: {BALANCED_PCA}{{d}} balances the PCA over the sub-quantizers of a PQ "
            "stage and there is none; use PCA{d} or PCAR{d}"
        )
    pca = faiss.PCAMatrix(dim, d_out, 0.0, False)
    pca.balanced_bins = pq.M
    index = faiss.IndexPreTransform(pca, inner)
    index.own_fields = True  # the C++ index deletes both; Python lets go of them
    pca.this.disown()
    inner.this.disown()
    return index


def make_index(dim: int, factory: str = "Flat") -> faiss.Index:
    """An empty index for ``dim``-d vectors scored by inner product; InputError on a bad factory string."""
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise InputError(f"descriptor dimension must be a positive integer, got {dim!r}")
    if not isinstance(factory, str) or not factory.strip():
        raise InputError(f"index factory must be a non-empty string such as {', '.join(FACTORY_EXAMPLES)}")
    factory = factory.strip()
    if factory.lower() in ("auto", COMPRESSED):
        raise InputError(
            f"factory {factory.lower()!r} depends on the database size: call build(vectors, {factory.lower()!r}) "
            "or resolve_factory(factory, n_vectors, dim), or name one such as 'Flat'"
        )
    factory, _ = split_rerank(factory)  # the candidate index of 'X+rerank' is X (build() adds the vectors)
    _check_factory_sizes(int(dim), factory)
    try:
        if BALANCED_PCA in factory:
            return _balanced_pca_index(int(dim), factory)
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except MemoryError:  # std::bad_alloc, for sizes under our bounds on a small machine
        raise InputError(f"not enough memory to make a FAISS index {factory!r} for {dim}-d vectors") from None
    except RuntimeError as exc:
        raise InputError(
            f"cannot make a FAISS index from factory string {factory!r} for {dim}-d vectors "
            f"({_faiss_reason(exc)}). Examples that work: {', '.join(FACTORY_EXAMPLES)} "
            "(PQ{m} needs m to divide the dimension)"
        ) from None


def suggest_factory(n_vectors: int, dim: int) -> str:
    """The factory string for ``"auto"``: Flat below ``FLAT_MAX_VECTORS``, then the ``compressed`` preset.

    From ``FLAT_MAX_VECTORS`` up, :func:`compressed_factory` (IVF + 4-bit PQ codes in RAM, exact re-ranking of
    the best candidates from float16 vectors on disk): dim/4 bytes a vector in RAM (16x less than Flat; ~dim/8,
    31x less, from ``SHORT_CODES_MIN_VECTORS`` up; ~dim/16, 60x less, from ``HALF_BIT_CODES_MIN_VECTORS`` up)
    and exact scores at the top (bench/index_scale.py), where
    the tiers below kept the whole code in RAM and
    returned approximate rankings. The tiers below are what ``auto`` chose before (it still does for dim < 8):

    Why (bench/search_scale.py, 2048-d, 1M vectors, 2 cores): Flat costs 8 KiB a vector (8.2 GB per 1M; 32.8 GB
    for 1M tiles x 4 rotations, more than this class of machine has) and 633 ms per single query at 1M.
    Below ``FLAT_MAX_VECTORS`` it is exact, needs no training and answers in ~0.1 s. Up to ``SQ8_MAX_BYTES``
    of codes ``IVF{nlist},SQ8`` (2 KiB a vector) keeps recall@100 at 0.93 (nprobe = nlist/16) and answers in
    26 ms; beyond, ``IVF{nlist},PQ{dim/8}`` (256 B a vector, 27x smaller than Flat, ~10 ms) is what fits, at
    recall@100 ~0.6 (the exact top-1 still in the top-100: re-rank or verify the candidates).
    nlist ~ 4 sqrt(n) as a power of two (4096 at 1M, 8192 at 4M), with >= 39 training points per list.
    """
    if n_vectors < 0 or dim <= 0:
        raise InputError(f"need n_vectors >= 0 and dim > 0, got n_vectors={n_vectors}, dim={dim}")
    if n_vectors < FLAT_MAX_VECTORS:
        return "Flat"
    if dim >= COMPRESSED_MIN_DIM:
        return compressed_factory(n_vectors, dim)
    nlist = 1 << max(8, round(math.log2(4 * math.sqrt(n_vectors))))
    while nlist > 256 and nlist * POINTS_PER_CENTROID > n_vectors:
        nlist //= 2
    nlist = min(nlist, 65536)
    if n_vectors * dim <= SQ8_MAX_BYTES:
        return f"IVF{nlist},SQ8"
    m = max(1, dim // 8)  # 8 dims per 8-bit sub-quantizer; m must divide dim
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


def _unwrap(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index)


def min_train_size(index: faiss.Index) -> int:
    """How many training vectors ``index`` needs (0 when it is trained or needs no training).

    The rules are the ones FAISS's k-means asks for (39 points per centroid): IVF{nlist} needs 39 * nlist,
    PQ (and OPQ) with 8-bit codes 39 * 256 = 9,984; SQ needs any non-empty sample.
    """
    if isinstance(index, RerankIndex):
        return min_train_size(index.base)
    idx = _unwrap(index)
    need = 0
    if isinstance(idx, faiss.IndexPreTransform):
        for i in range(idx.chain.size()):
            vt = faiss.downcast_VectorTransform(idx.chain.at(i))
            if vt.is_trained:
                continue
            if isinstance(vt, faiss.OPQMatrix):
                need = max(need, POINTS_PER_CENTROID * 256)
            elif isinstance(vt, faiss.PCAMatrix):
                need = max(need, vt.d_out + 1)
            else:
                need = max(need, 1)
        return max(need, min_train_size(idx.index))
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return min_train_size(idx.index)
    if isinstance(idx, faiss.IndexRefine):
        return max(min_train_size(idx.base_index), min_train_size(idx.refine_index))
    if idx.is_trained:
        return 0
    if isinstance(idx, faiss.IndexIVF):
        if not (idx.quantizer.is_trained and idx.quantizer.ntotal == idx.nlist):
            need = POINTS_PER_CENTROID * idx.nlist
        if isinstance(idx, faiss.IndexIVFPQ):
            need = max(need, POINTS_PER_CENTROID * idx.pq.ksub)
        elif isinstance(idx, faiss.IndexIVFPQFastScan):  # 4-bit codes: 16 centroids, k-means needs >= 16
            need = max(need, idx.pq.ksub)
        return max(need, 1)
    if isinstance(idx, faiss.IndexHNSW):
        return max(1, min_train_size(idx.storage))
    if isinstance(idx, faiss.IndexPQ):
        return POINTS_PER_CENTROID * idx.pq.ksub
    return 1


def _layers(index: faiss.Index, *, into_hnsw_storage: bool = False):
    """The index and the indexes it wraps (OPQ/PCA pre-transforms, IDMap, the base of a Refine; the storage
    of an HNSW when asked), outermost first, each downcast to its concrete FAISS class."""
    idx = _unwrap(index)
    while True:
        yield idx
        if isinstance(idx, faiss.IndexPreTransform | faiss.IndexIDMap | faiss.IndexIDMap2):
            idx = _unwrap(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            idx = _unwrap(idx.base_index)
        elif into_hnsw_storage and isinstance(idx, faiss.IndexHNSW):
            idx = _unwrap(idx.storage)
        else:
            return


def _first_pq(index: faiss.Index) -> faiss.ProductQuantizer | None:
    """The product quantizer of the outermost PQ layer of ``index`` (a Refine's base, not its refinement)."""
    return next((layer.pq for layer in _layers(index) if hasattr(layer, "pq")), None)


def _skip_polysemous_training(index: faiss.Index) -> None:
    """index_factory turns on polysemous training for PQ: a simulated annealing that reorders each
    sub-quantizer's codes for Hamming filtering, which we never use (polysemous_ht = 0). It costs ~1.5 s per
    sub-quantizer whatever the data size (PQ256: ~6 min), so switch it off."""
    for idx in _layers(index, into_hnsw_storage=True):
        if isinstance(idx, faiss.IndexIVFPQ | faiss.IndexPQ):
            idx.do_polysemous_training = False


def _train(index: faiss.Index, sample: np.ndarray) -> None:
    """``index.train(sample)``, except that a PCA in front of an inner-product index keeps no mean.

    FAISS's PCA subtracts the training mean from database vectors and queries alike, which scores
    (q - m).(x - m) instead of q.x: vectors with a large component along the mean lose, and descriptors
    share a large mean (|m|^2 ~0.58 for the default model's). Measured (100k x 2048-d photo-like synthetic
    vectors, PCAR1920,IVF256,PQ960x4fsr, 1000 candidates re-ranked): recall@100 0.82 centred, 0.9925 without
    the mean (0.9922 with no PCA at all). The principal axes are kept; the part of the mean in the dropped
    axes is the same for every vector, so it shifts all scores of a query equally.

    A trained PCA also drops its dim x dim eigenvector matrix (``PCAMat``): it only serves to compute the
    d' x dim transform (``A``), which is kept, and it would take 16.8 MB of RAM and file at 2048-d (5 % of a
    1M-vector compressed index).
    """
    idx = _unwrap(index)
    if not (isinstance(idx, faiss.IndexPreTransform) and idx.metric_type == faiss.METRIC_INNER_PRODUCT):
        index.train(sample)
        return
    x = sample
    for i in range(idx.chain.size()):
        vt = faiss.downcast_VectorTransform(idx.chain.at(i))
        if not vt.is_trained:
            vt.train(x)
            if isinstance(vt, faiss.PCAMatrix):
                faiss.copy_array_to_vector(np.zeros(vt.d_in, dtype=np.float32), vt.mean)
                faiss.copy_array_to_vector(np.zeros(vt.d_out, dtype=np.float32), vt.b)
                vt.PCAMat.clear()
        x = vt.apply(x)
    if not idx.index.is_trained:
        idx.index.train(x)
    idx.is_trained = True


def _set_default_search_knobs(index: faiss.Index) -> None:
    """Give IVF/HNSW/Refine indexes a recall-worthy default nprobe/efSearch/k_factor (stored in the file by
    FAISS). FAISS's k_factor 1 would refine only the k the base returns: no refinement at all."""
    for idx in _layers(index):
        if isinstance(idx, faiss.IndexRefine):
            idx.k_factor = max(idx.k_factor, REFINE_K_FACTOR)
        elif isinstance(idx, faiss.IndexIVF):
            idx.nprobe = max(1, min(idx.nlist, round(idx.nlist * DEFAULT_NPROBE_FRACTION)))
        elif isinstance(idx, faiss.IndexHNSW):
            idx.hnsw.efSearch = max(idx.hnsw.efSearch, DEFAULT_EF_SEARCH)


def _check_vectors(vectors: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    # descriptors read from a build's chunk files stay there (read by slices), never one array in RAM
    arr = vectors if isinstance(vectors, ChunkedVectors) else np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty 2-d array (n, dim), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{what} have dimension {arr.shape[1]} but the index holds {dim}-d vectors")
    return arr


def build(
    vectors: np.ndarray,
    factory: str | faiss.Index = "Flat",
    *,
    train_size: int | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
    cancel: CancelToken | None = None,
    ids: np.ndarray | None = None,
) -> faiss.Index:
    """Make, train (on a random sample) and fill an inner-product index; ids are row numbers of ``vectors``.

    ``vectors`` (n, dim), L2-normalised, is read in chunks: a float32 C-contiguous array (or np.memmap) is
    never copied whole. ``train_size`` defaults to max(what the index needs, 100k), capped at n; a sample
    is enough for k-means/PQ and keeps training time independent of n. ``factory="auto"`` picks
    :func:`suggest_factory`. Progress: training takes the first 30 % of the bar when the index needs it.
    ``ids`` (int64, one per row) gives other ids than row numbers: with ``IDMap,...`` factories or IVF.
    ``factory`` may also be an empty index made by :func:`make_index` and prepared by the caller (e.g. an IVF
    given an already trained coarse quantizer, which is then not trained again).

    ``factory="compressed"`` (see ``COMPRESSED``) or any ``"<factory>+rerank"`` returns a
    :class:`RerankIndex`: the candidate index over the codes plus ``vectors`` itself (a reference, not a
    copy) to re-rank with; :func:`write_index` stores those as float16 beside the index file.
    """
    arr = _check_vectors(vectors, "database vectors")
    n, dim = arr.shape
    report = progress or no_progress
    rerank = False
    if isinstance(factory, faiss.Index):
        index = factory
        factory = type(_unwrap(index)).__name__
        if index.d != dim or index.ntotal:
            raise InputError(
                f"the given index must be empty and {dim}-d (it is {index.d}-d, {index.ntotal} vectors)"
            )
    else:
        if isinstance(factory, str):
            factory = resolve_factory(factory, n, dim)
            rerank = split_rerank(factory)[1]
        if rerank and ids is not None:
            raise InputError(f"index {factory!r} numbers its vectors by row (0 .. n-1): ids cannot be given")
        index = make_index(dim, factory)

    train_share = 0.0
    if not index.is_trained:
        train_share = 0.3
        need = min_train_size(index)
        if train_size is not None and train_size < 1:
            raise InputError(f"train_size must be positive, got {train_size}")
        n_train = min(n, train_size if train_size is not None else max(need, 100_000))
        if n_train < need:
            raise InputError(_too_small_message(factory, need, n_train, n, dim))
        report(0.0, f"training {factory} on {n_train:,} of {n:,} vectors")
        if n_train == n:
            sample = np.ascontiguousarray(arr[0:n], dtype=np.float32)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
            sample = np.ascontiguousarray(arr[rows], dtype=np.float32)
        _skip_polysemous_training(index)
        try:
            _train(index, sample)
        except RuntimeError as exc:
            raise InputError(f"cannot train index {factory!r}: {_faiss_reason(exc)}") from None
        del sample
        if cancel is not None:
            cancel.check()
        report(train_share, f"trained {factory}")
    _set_default_search_knobs(index)
    if rerank:
        for layer in _layers(index):
            if isinstance(layer, faiss.IndexIVF):
                layer.nprobe = max(1, min(layer.nlist, round(layer.nlist * COMPRESSED_NPROBE_FRACTION)))

    def sub_report(fraction: float, message: str) -> None:
        report(train_share + (1.0 - train_share) * fraction, message)

    add_vectors(index, arr, ids=ids, progress=sub_report, cancel=cancel)
    return RerankIndex(index, arr) if rerank else index


def check_buildable(n_vectors: int, dim: int, factory: str) -> str:
    """Resolve ``factory`` ("auto" included) and check a database of ``n_vectors`` can train it.

    Called before any encoding, so that a bad factory string or a too-small database fails in a second, not
    after an hour of encoding. Returns the resolved factory string.
    """
    factory = resolve_factory(factory, n_vectors, dim)
    nlist = declared_nlist(factory)  # checked before make_index: the lists are allocated when it is made
    if nlist and n_vectors < POINTS_PER_CENTROID * nlist:
        raise InputError(_too_small_message(factory, POINTS_PER_CENTROID * nlist, n_vectors, n_vectors, dim))
    need = min_train_size(make_index(dim, factory))
    if n_vectors < need:
        raise InputError(_too_small_message(factory, need, n_vectors, n_vectors, dim))
    return factory


def _too_small_message(factory: str, need: int, n_train: int, n: int, dim: int) -> str:
    if n_train < n:
        return (
            f"index {factory!r} needs at least {need:,} training vectors but train_size is {n_train:,}; "
            f"raise train_size (the database has {n:,})"
        )
    hint = ""
    if "IVF" in factory.upper() and ("PQ" not in factory.upper() or n >= POINTS_PER_CENTROID * 256):
        fits = 1 << int(math.log2(max(1, n // POINTS_PER_CENTROID)))
        hint = f", or fewer IVF lists (IVF{fits} fits {n:,} vectors)"
    elif "PQ" in factory.upper():
        hint = f" (8-bit PQ/OPQ needs {POINTS_PER_CENTROID * 256:,}), or 'SQ8' to compress a small database"
    return (
        f"index {factory!r} needs at least {need:,} training vectors (39 per k-means centroid) but the "
        f"database has only {n:,}. Use 'Flat' (exact; right for fewer than {FLAT_MAX_VECTORS:,} vectors), "
        f"or 'auto' (suggests {suggest_factory(n, dim)!r}){hint}"
    )


def add_vectors(
    index: faiss.Index,
    vectors: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> None:
    """Append ``vectors`` to a trained index in 256 MiB chunks (progress and cancellation between chunks).

    Ids continue from ``index.ntotal`` (row numbers), or are ``ids`` (IVF and ``IDMap,...`` indexes only;
    an ``IDMap`` index without ``ids`` gets the running row numbers too).
    """
    if isinstance(index, RerankIndex):
        raise InputError(
            "vectors cannot be added to a compressed (+rerank) index: its float16 vector file is written "
            "whole; build it again with all the vectors"
        )
    if index in _READ_ONLY:
        raise InputError(
            "this index was read with mmap=True and is read-only (FAISS would abort on add); "
            "read it with mmap=False to add vectors"
        )
    if not index.is_trained:
        raise InputError("the index must be trained before vectors are added (use build())")
    arr = _check_vectors(vectors, "vectors to add", index.d)
    report = progress or no_progress
    n = arr.shape[0]
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must be {n} integers (one per vector), got shape {ids.shape} {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
    elif isinstance(_unwrap(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        ids = np.arange(index.ntotal, index.ntotal + n, dtype=np.int64)
    chunk = max(1, _CHUNK_BYTES // (4 * arr.shape[1]))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = np.ascontiguousarray(arr[start:stop], dtype=np.float32)
        if ids is None:
            index.add(part)
        else:
            try:
                index.add_with_ids(part, np.ascontiguousarray(ids[start:stop]))
            except RuntimeError as exc:
                raise InputError(
                    f"this index cannot take explicit ids ({_faiss_reason(exc)}): use an 'IDMap,<factory>' "
                    "factory or an IVF index"
                ) from None
        report(stop / n, f"added {stop:,} / {n:,} vectors")
        if cancel is not None:
            cancel.check()


# ----------------------------------------------------------------------------------------------- search


def _selector(allowed: np.ndarray) -> tuple[faiss.IDSelector, object, int]:
    """(selector, buffer it points into (keep alive during the search), number of distinct allowed ids).

    A bitmap (1 bit per id up to the largest allowed id) is the cheapest membership test and costs less
    memory than IDSelectorBatch's hash set (4M ids: 0.5 MB vs ~100 MB); used unless the ids are sparse
    and huge (IDMap with arbitrary 64-bit ids), where IDSelectorBatch is used.
    """
    top = int(allowed.max())
    if top < max(64 * allowed.size, 1 << 24):
        mask = np.zeros(top + 1, dtype=bool)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")
        return faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), bitmap, int(mask.sum())
    uniq = _sorted_unique(allowed)
    return faiss.IDSelectorBatch(uniq), uniq, int(uniq.size)


def _params(
    index: faiss.Index,
    sel: faiss.IDSelector | None,
    nprobe: int | None,
    ef_search: int | None,
    fraction: float,
) -> faiss.SearchParameters | None:
    """Search parameters of the right class for ``index`` (FAISS rejects a base-class object for IVF/PQ).

    Wrappers: IndexPreTransform (OPQ/PCA) takes SearchParametersPreTransform(index_params=<inner params>);
    IndexIDMap passes its params to the inner index, translating ``sel`` to external ids; IndexRefine takes
    IndexRefineSearchParameters(base_index_params=...). Unset knobs keep the index's own values (a fresh
    SearchParametersIVF would otherwise mean nprobe=1). ``fraction`` (allowed / total) widens nprobe and
    efSearch by 1/fraction so that a filter still sees ~as many allowed candidates as an unfiltered search.
    """
    idx = _unwrap(index)
    if isinstance(idx, faiss.IndexPreTransform):
        inner = _params(idx.index, sel, nprobe, ef_search, fraction)
        if inner is None:
            return None
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        return p
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return _params(idx.index, sel, nprobe, ef_search, fraction)
    if isinstance(idx, faiss.IndexRefine):
        base = _params(idx.base_index, sel, nprobe, ef_search, fraction)
        if base is None:
            return None
        p = faiss.IndexRefineSearchParameters()
        p.k_factor = idx.k_factor
        p.base_index_params = base
        return p
    if isinstance(idx, faiss.IndexIVF):
        if sel is None and nprobe is None:
            return None
        probe = nprobe if nprobe is not None else idx.nprobe
        probe = min(idx.nlist, math.ceil(probe / fraction))
        p = faiss.SearchParametersIVF()
        p.nprobe = max(1, probe)
        p.max_codes = idx.max_codes
    elif isinstance(idx, faiss.IndexHNSW):
        if sel is None and ef_search is None:
            return None
        ef = ef_search if ef_search is not None else idx.hnsw.efSearch
        p = faiss.SearchParametersHNSW()
        p.efSearch = max(1, min(1 << 16, math.ceil(ef / fraction)))
        p.check_relative_distance = idx.hnsw.check_relative_distance
        p.bounded_queue = idx.hnsw.search_bounded_queue
    elif isinstance(idx, faiss.IndexPQ):
        if sel is None:
            return None
        p = faiss.SearchParametersPQ()
        p.search_type = idx.search_type
        p.polysemous_ht = idx.polysemous_ht
    else:
        if sel is None:
            return None
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


#: With a filter this selective (allowed / total) or less, an HNSW index with exact storage is searched by a
#: filtered exact scan of its storage instead of the graph: graph search under a tight filter returns too few
#: or wrong neighbours, and the filtered scan costs only ~the allowed vectors' dot products.
HNSW_EXACT_FRACTION = 0.05


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    allowed_ids: np.ndarray | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    rerank: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: (scores float32 (nq, k), ids int64 (nq, k)); missing hits: id -1, -inf.

    ``allowed_ids`` restricts results to those ids (an area filter) inside FAISS (IDSelector via search
    parameters), for Flat, SQ, IVF* (incl. IVF-PQ), HNSW and wrapped (OPQ/PCA, IDMap, Refine) indexes; plain
    ``PQ{m}`` (IndexPQ) cannot filter and raises InputError. A filter keeping a
    fraction f of the database multiplies nprobe / efSearch by 1/f (capped at nlist) so that the search still
    meets ~as many allowed candidates as without a filter: IVF's extra lists are scanned with a bitmap test
    per entry and distances only for allowed ids, so this costs little. HNSW over exact storage with f <=
    ``HNSW_EXACT_FRACTION`` is answered by an exact filtered scan of its storage. ``nprobe`` / ``ef_search``
    apply per call (ignored by index types without them) and leave the index untouched.

    A :class:`RerankIndex` (the ``compressed`` preset) takes max(k, ``rerank``, default its own
    ``rerank``) candidates from its codes, filtered the same way, and returns the best ``k`` of them by exact
    inner product from its full vectors; a filter allowing no more ids than that is scored exactly whole.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    for name, val in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank", rerank)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise InputError(f"{name} must be a positive integer, got {val!r}")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    q = np.ascontiguousarray(_check_vectors(q, "queries", index.d), dtype=np.float32)
    nq, k = q.shape[0], int(k)

    def empty() -> tuple[np.ndarray, np.ndarray]:
        return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)

    if index.ntotal == 0:
        return empty()

    sel, keep, fraction = None, None, 1.0
    target = index
    if allowed_ids is not None:
        allowed = np.asarray(allowed_ids).ravel()
        if allowed.size and not np.issubdtype(allowed.dtype, np.integer):
            raise InputError(f"allowed_ids must be integers, got dtype {allowed.dtype}")
        allowed = allowed.astype(np.int64, copy=False)
        if allowed.size == 0:
            return empty()
        if allowed.min() < 0:
            raise InputError("allowed_ids must be non-negative ids")
        if isinstance(index, RerankIndex):
            return _search_rerank(index, q, k, allowed, nprobe, ef_search, rerank)
        sel, keep, count = _selector(allowed)
        fraction = min(1.0, count / index.ntotal)
        idx = _unwrap(index)
        sequential = not isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2))
        if sequential and count >= index.ntotal and int(allowed.max()) < index.ntotal:
            sel, keep = None, None  # every id allowed: the unfiltered search is the same and faster (BLAS)
        elif (
            isinstance(idx, faiss.IndexHNSW)
            and fraction <= HNSW_EXACT_FRACTION
            and isinstance(_unwrap(idx.storage), faiss.IndexFlat)
        ):
            target, fraction = idx.storage, 1.0
    elif isinstance(index, RerankIndex):
        return _search_rerank(index, q, k, None, nprobe, ef_search, rerank)

    params = _params(target, sel, nprobe, ef_search, fraction)
    _pick_fast_scan_strategy(target, nq)
    try:
        scores, ids = target.search(q, k, params=params)
    except RuntimeError as exc:
        hint = (
            " (allowed_ids works with Flat, SQ, IVF*, HNSW* and their OPQ/IDMap wrappers)"
            if sel is not None
            else ""
        )
        raise InputError(
            f"FAISS cannot search a {type(_unwrap(index)).__name__} with these parameters: "
            f"{_faiss_reason(exc)}{hint}"
        ) from None
    del keep  # the selector's buffer must outlive the search call
    scores[ids < 0] = -np.inf
    return scores, ids


# ------------------------------------------------------------------------ compressed index, exact re-rank

#: The named preset for large databases (``--factory compressed``; ``auto`` picks it from
#: ``FLAT_MAX_VECTORS`` vectors up). RAM holds only an IVF index of 4-bit fast-scan PQ codes of the residuals
#: that finds the best candidates (:func:`default_rerank` of them); those are re-ranked by their exact cosine
#: from the full vectors, kept on disk beside the index as a float16 ``.npy`` (:func:`rerank_file`) that is
#: memory-mapped, so the OS pages in only the rows a query touches. Three forms (:func:`compressed_factory`; the
#: manifest records the resolved string): 2 bits a dimension (``IVF256,PQ1024x4fsr+rerank`` at 100k x 2048-d,
#: 1000 candidates) below ``SHORT_CODES_MIN_VECTORS``; from there up, 1 bit a dimension of a balanced PCA
#: (``PCAB1920,IVF1024,PQ480x4fsr+rerank`` at 1M: 240 B a vector, 3000 candidates); from
#: ``HALF_BIT_CODES_MIN_VECTORS`` up, half a bit (``PCAB1920,IVF2048,PQ240x4fsr+rerank`` at 4M: 120 B a vector,
#: 60x less than Flat, 10,000 candidates).
#: Any FAISS factory string ending in ``+rerank`` works the same way.
COMPRESSED = "compressed"
RERANK_SUFFIX = "+rerank"
#: Candidates re-ranked exactly per query by an index whose codes hold 2 bits a dimension or more, unless
#: a search asks for more (k larger) or sets ``rerank``. Measured (bench/results/index_scale.txt, 2048-d,
#: photo-like queries: cos ~0.78 to their tile, as the default model's ISS photos, 2 cores): at 100k the
#: preset's IVF256,PQ1024x4fsr gives recall@100 0.998 and every exact top-1 with 1000; at 4M the 2-bit
#: PCAR1920,IVF2048,PQ960x4fsr (the preset of sessions 23-25) 0.997 with 1000 (2000: 0.999).
DEFAULT_RERANK = 1000
#: Candidates re-ranked by an index with coarser codes (under 2 bits a dimension: the preset's short codes
#: from ``SHORT_CODES_MIN_VECTORS`` up): they rank more coarsely, and a denser database needs more of them.
#: Measured (bench/results/index_scale.txt, session 25's data, PCAB1920,...,PQ480x4fsr): recall@100 0.997 at
#: 100k with 1000; at 1M 0.992 / 0.996 / 0.997 with 1000 / 2000 / 3000; at 4M 0.981 / 0.993 / 0.996, every
#: exact top-1. On session 26's data (index_scale_lite1.txt), the preset at 1M: 0.992 / 0.997 / 0.997.
SHORT_CODE_RERANK = 3000
#: Candidates re-ranked by an index whose codes hold under 1 bit a dimension (the preset from
#: ``HALF_BIT_CODES_MIN_VECTORS`` up: ``PCAB1920,IVF2048,PQ240x4fsr+rerank`` at 4M, 120 B a vector). Measured at 4M (session 26's data, 300
#: photo-like queries, 5/8 of the lists): recall@100 0.976 / 0.983 / 0.990 / 0.993 / 0.995 / 0.996 with 3000 /
#: 4000 / 6000 / 8000 / 10,000 / 12,000 candidates, every exact top-1 (scratch of session 27, from the scan's
#: own candidates; bench/results/index_scale_lite1_s27.txt for the index).
COARSE_CODE_RERANK = 10_000
#: Share of the IVF lists a compressed index probes by default (higher than ``DEFAULT_NPROBE_FRACTION``:
#: fast-scan codes are cheap to scan and the candidates must hold the exact top-k, not approximate it).
#: Measured at 4M (the 2-bit PCAR preset, 1000 candidates, 300 queries): nlist x 1/2 gives recall@100 0.995
#: and the exact top-1 for 298 queries (the 2 others' top-1 lies in a list they rank 1024-1280th); 5/8 0.997
#: and every top-1; 3/4 0.998; all lists 0.998. The balanced PCA's codes: 5/8 0.993, 1/2 0.991 (2000
#: candidates).
COMPRESSED_NPROBE_FRACTION = 5 / 8
#: Dimensions per 4-bit PQ sub-quantizer of the preset below ``SHORT_CODES_MIN_VECTORS``: 2 bits a dimension.
COMPRESSED_DIMS_PER_CODE = 2
#: ... and from there up, of the balanced PCA's dimensions (``BALANCED_PCA``): 1 bit a dimension.
SHORT_CODE_DIMS_PER_CODE = 4
#: From this many vectors up the preset is ``PCAB{d'},IVF{nlist},PQ{d'/4}x4fsr+rerank``: half the RAM of 2-bit
#: codes, and faster where the scan of the codes dominates a query. Measured (2048-d, 2 cores,
#: bench/results/index_scale.txt, session 25's data; the PCA then kept a 16.8 MB matrix): at 1M 292 MB and 34
#: ms a single query with 3000 candidates (recall@100 0.997) vs 536 MB and 33 ms for the 2-bit PCAR codes with
#: 1000 (0.997); at 4M 1.05 GB and 61 ms (0.996) vs 2.02 GB and 103 ms (0.997). At 100k they are no smaller
#: (the PCA's matrices) and slower (3000 candidates), so smaller databases keep the 2-bit codes of every
#: dimension.
SHORT_CODES_MIN_VECTORS = 500_000
#: From this many vectors up the preset keeps half a bit a dimension of the balanced PCA (d'/8 sub-quantizers,
#: 120 B a vector at 2048-d) and re-ranks ``COARSE_CODE_RERANK`` candidates: the scan of the codes, which
#: grows with the database, costs half; the re-rank of more candidates does not grow with it. Measured at 4M
#: (session 28, bench/results/index_scale_lite1_s28.txt and rerank_cost_s28.txt, 2 cores):
#: ``PCAB1920,IVF2048,PQ240x4fsr+rerank`` gives recall@100 0.995 and every exact top-1 from 547.5 MB in
#: 40-50 ms a warm single query (its scan ~27 ms, the re-rank of 10,000 rows ~11); 1-bit codes scan twice the
#: bytes (at 1M the scan of the 1-bit preset took 19 of its 29.7 ms, session 27). The crossover, from the
#: per-vector scan and per-row re-rank costs measured at 4M, lies near 2M vectors (not measured there).
HALF_BIT_CODES_MIN_VECTORS = 2_000_000
#: Dimensions per 4-bit sub-quantizer of the preset from ``HALF_BIT_CODES_MIN_VECTORS`` up.
HALF_BIT_CODE_DIMS_PER_CODE = 8
#: ... for PCA dimensions d' from this many up (>= 64 sub-quantizers; measured with 240): lower-dimensional
#: descriptors keep 1 bit a dimension.
HALF_BIT_CODES_MIN_DIM = 512
#: Dimensions the balanced PCA drops (uncentred, see :func:`_train`): 1/16 of them (2048 -> 1920), the
#: lowest-variance axes (0.2-0.7 % of the variance under power-law spectra i^-1.29 .. i^-1.04, the slopes
#: fitted on the synthetic and the real descriptors).
COMPRESSED_DROP_FRACTION = 1 / 16
#: Below this dimension ``auto`` keeps its older tiers (IVF + SQ8/PQ) instead of the compressed preset.
COMPRESSED_MIN_DIM = 8


def rerank_file(index_path: str | os.PathLike) -> Path:
    """Where a compressed index keeps its full vectors: ``index.faiss`` -> ``index.f16.npy`` beside it."""
    p = Path(index_path)
    return p.with_name(p.stem + ".f16.npy")


def split_rerank(factory: str) -> tuple[str, bool]:
    """(the FAISS factory string, whether it asks for exact re-ranking): ``'IVF64,PQ8x4fs+rerank'`` ->
    ``('IVF64,PQ8x4fs', True)``."""
    f = factory.strip()
    if f.lower().endswith(RERANK_SUFFIX):
        return f[: -len(RERANK_SUFFIX)].strip(), True
    return f, False


def short_codes_pay(n_vectors: int, dim: int) -> bool:
    """Whether the preset uses the balanced PCA's 1-bit-a-dimension codes for ``n_vectors`` ``dim``-d vectors:
    from ``SHORT_CODES_MIN_VECTORS`` up, where the codes they save (dim/4 - d'/8 bytes a vector) also outweigh
    the PCA's float32 matrices (d' x dim and dim x dim: 32 MB at 2048-d), and for dims that leave d'/4
    sub-quantizers (>= 32)."""
    keep = _short_code_dims(dim)
    saved = n_vectors * (dim // 4 - keep // 8)
    return n_vectors >= SHORT_CODES_MIN_VECTORS and dim >= 32 and saved > 4 * dim * (keep + dim)


def _short_code_dims(dim: int) -> int:
    keep = dim - int(dim * COMPRESSED_DROP_FRACTION)
    return keep - keep % SHORT_CODE_DIMS_PER_CODE


def compressed_factory(n_vectors: int, dim: int) -> str:
    """What the ``compressed`` preset means for ``n_vectors`` ``dim``-d vectors.

    nlist ~ sqrt(n) as a power of two (1024 at 1M, 2048 at 4M), with >= 39 vectors per list (down to IVF1
    for a small database); 4-bit fast-scan sub-quantizers encoding the residual to the list's centroid:
    - below ``SHORT_CODES_MIN_VECTORS`` (:func:`short_codes_pay`): ``IVF{nlist},PQ{dim/2}x4fsr+rerank``, 2 bits
      a dimension (dim/4 bytes a vector), ``DEFAULT_RERANK`` candidates;
    - from there up: ``PCAB{d'},IVF{nlist},PQ{d'/4}x4fsr+rerank``, a balanced PCA (``BALANCED_PCA``;
      uncentred, see :func:`_train`) to d' = 15/16 of the dims, then 1 bit a dimension (d'/8 bytes: 240 B at
      2048-d), ``SHORT_CODE_RERANK`` candidates (:func:`default_rerank`);
    - from ``HALF_BIT_CODES_MIN_VECTORS`` up (d' >= ``HALF_BIT_CODES_MIN_DIM``, a multiple of 8):
      ``PCAB{d'},IVF{nlist},PQ{d'/8}x4fsr+rerank``,
      half a bit a dimension (120 B at 2048-d), ``COARSE_CODE_RERANK`` candidates.
    Fewer, longer lists than ``suggest_factory``'s plain IVF (4 sqrt(n)): fast-scan makes long lists cheap
    to scan, the coarse k-means and the assignment of every vector cost ~4x less, and finer lists would not
    let a query scan less (8k or 16k lists at 4M need the same ~half of the database scanned:
    ``bench/ivf_partition.py``). Needs at least 39 vectors; below that, use Flat.
    """
    if n_vectors < POINTS_PER_CENTROID:
        raise InputError(
            f"the {COMPRESSED!r} index needs at least {POINTS_PER_CENTROID} vectors to train its codebooks, "
            f"the database has {n_vectors:,}: use 'Flat' (exact, and right for fewer than "
            f"{FLAT_MAX_VECTORS:,} vectors) or 'auto'"
        )
    nlist = 1 << max(0, round(math.log2(math.sqrt(n_vectors))))
    while nlist > 1 and nlist * POINTS_PER_CENTROID > n_vectors:
        nlist //= 2
    nlist = min(nlist, 65536)
    if short_codes_pay(n_vectors, dim):
        keep = _short_code_dims(dim)
        per = SHORT_CODE_DIMS_PER_CODE
        if (
            n_vectors >= HALF_BIT_CODES_MIN_VECTORS
            and keep >= HALF_BIT_CODES_MIN_DIM
            and keep % HALF_BIT_CODE_DIMS_PER_CODE == 0
        ):
            per = HALF_BIT_CODE_DIMS_PER_CODE
        return f"{BALANCED_PCA}{keep},IVF{nlist},PQ{keep // per}x4fsr{RERANK_SUFFIX}"
    m = max(1, dim // COMPRESSED_DIMS_PER_CODE)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}x4fsr{RERANK_SUFFIX}"


def _ranking_pq(index: faiss.Index) -> faiss.ProductQuantizer | None:
    """The PQ whose codes rank the candidates that the exact re-rank receives: a Refine stage's codes when
    there is one (None for a Flat or SQ refinement), else the outermost PQ."""
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexRefine):
            return _first_pq(layer.refine_index)
    return _first_pq(index)


def default_rerank(base: faiss.Index) -> int:
    """Candidates a compressed index over ``base`` re-ranks by default, from the bits a dimension of the codes
    that rank them (:func:`_ranking_pq`): ``DEFAULT_RERANK`` from 2 bits (or no PQ), ``SHORT_CODE_RERANK``
    from 1, ``COARSE_CODE_RERANK`` under 1. Read from the codes themselves, so an index written by an older
    Skyloc, or built with a user's ``--factory``, gets the count its codes need."""
    pq = _ranking_pq(base)
    if pq is None or pq.nbits >= COMPRESSED_DIMS_PER_CODE * pq.dsub:
        return DEFAULT_RERANK
    if pq.nbits >= pq.dsub:
        return SHORT_CODE_RERANK
    return COARSE_CODE_RERANK


def resolve_factory(factory: str, n_vectors: int, dim: int) -> str:
    """``auto`` and ``compressed`` resolved for a database of this size; other strings as given (stripped)."""
    f = factory.strip()
    if f.lower() == "auto":
        return suggest_factory(n_vectors, dim)
    if f.lower() == COMPRESSED:
        return compressed_factory(n_vectors, dim)
    return f


class RerankIndex:
    """A candidate index (codes, in RAM) + the full vectors (float16, usually memory-mapped) to re-rank with.

    Searched through :func:`search` like any index: the base index finds ``rerank`` candidates (area filters
    applied inside FAISS), whose exact inner products with the query (float32 arithmetic on the stored float16
    vectors) give the returned order and scores. Ids are row numbers of ``vectors``.
    """

    def __init__(self, base: faiss.Index, vectors: np.ndarray, rerank: int | None = None):
        if vectors.ndim != 2 or vectors.shape != (base.ntotal, base.d):
            raise InputError(
                f"re-rank vectors have shape {vectors.shape} but the index holds {base.ntotal:,} "
                f"{base.d}-d vectors (the files of a compressed index do not belong together)"
            )
        if rerank is None:
            rerank = default_rerank(base)
        if not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise InputError(f"rerank must be a positive integer, got {rerank!r}")
        self.base = base
        self.vectors = vectors
        self.rerank = int(rerank)

    @property
    def d(self) -> int:
        return self.base.d

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    @property
    def is_trained(self) -> bool:
        return self.base.is_trained

    def __repr__(self) -> str:
        kind = "memory-mapped" if isinstance(self.vectors, np.memmap) else "in-memory"
        return (
            f"RerankIndex({type(_unwrap(self.base)).__name__}, {self.ntotal:,} x {self.d}, "
            f"{kind} {self.vectors.dtype} vectors, rerank={self.rerank})"
        )


#: A compressed index probes at least enough IVF lists to hold this many times the candidates it re-ranks (on
#: average): with few lists (a small database) nlist/16 lists would not even hold ``rerank`` vectors.
RERANK_PROBE_MARGIN = 4

# Rows gathered, widened and scored at a time while re-ranking: 256 x 2048 float32 is 2 MiB, which stays in
# the cache between the widening and the dot products (1024-row blocks, 8 MiB, were slower).
_RERANK_BLOCK = 256

_TORCH_LOCK = threading.Lock()


@functools.cache
def _torch():
    """torch, imported on the first re-rank (not at import: most callers of this module never re-rank).

    ``torch.from_numpy`` of a read-only array (every memory-mapped vector file) warns once per process that
    the tensor is not writable; it is only read here, so that one warning is taken under a lock, out of sight.
    """
    with _TORCH_LOCK:
        import torch

        ro = np.zeros(1, dtype=np.float16)
        ro.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(ro)
        return torch


@functools.cache
def _torch_openmp():
    """``(omp_get_max_threads, omp_set_num_threads)`` of the OpenMP runtime torch's CPU kernels use, or None.

    OpenMP thread counts belong to the calling thread: setting torch's to 1 here leaves every other thread,
    and torch's own setting (``torch.set_num_threads``), as they are. None where torch has no libgomp of its
    own (macOS, Windows wheels) or the one found is not the one torch uses: the re-rank then runs on torch's
    threads, with the same results.
    """
    import ctypes

    torch = _torch()
    here = Path(torch.__file__).parent
    for lib_path in sorted([*here.glob("lib/libgomp*.so*"), *here.parent.glob("torch.libs/libgomp*.so*")]):
        try:
            lib = ctypes.CDLL(str(lib_path))
            get, put = lib.omp_get_max_threads, lib.omp_set_num_threads
        except (OSError, AttributeError):
            continue
        torch.get_num_threads()  # torch sets a thread's count on its first use there: do that first
        before = get()
        put(1)
        ok = torch.get_num_threads() == 1
        put(before)
        if ok and torch.get_num_threads() == before:
            return get, put
    return None


@contextlib.contextmanager
def _torch_on_this_thread():
    """Run torch's CPU kernels on the calling thread alone while inside.

    Woken OpenMP threads of torch keep spinning after a kernel and slow the FAISS scan of the next query:
    at 1M, warm single queries took 38 ms with torch's 2 threads re-ranking, 28 ms with one (interleaved
    runs; OMP_WAIT_POLICY=PASSIVE removes the difference but slows FAISS).
    """
    torch = _torch()
    omp = _torch_openmp()
    if omp is None:
        yield
        return
    get, put = omp
    torch.get_num_threads()  # this thread's first torch use would reset the count: do it before
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


#: Candidate rows whose pages are looked up in the page cache before a re-rank (``_rows_resident``).
RESIDENCY_SAMPLE = 32


@functools.cache
def _mincore():
    """libc's ``mincore`` through ctypes, or None where there is none (Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _rows_resident(vectors: np.ndarray, rows: np.ndarray) -> bool:
    """Whether the pages of ``RESIDENCY_SAMPLE`` of ``rows`` (spread over them) are all in the page cache.

    The prefetch costs ~3 us a row even when every page is in RAM (one ``madvise`` call a row): 9 ms of a
    warm 3000-row re-rank whose scoring takes 5. A warm query skips it; a sample with one page out of the
    cache sends the whole query through it. The rows a sample misses (evicted under memory pressure) fault
    in one by one: ``_prefetch`` marks the mapping ``MADV_RANDOM`` so that each such fault reads its own
    pages, not 128 KiB around them (1M preset, warm queries right after a cold pass: 31 ms, against 39 ms
    always prefetching and 57 ms with the kernel's read-around). False when it cannot tell.
    """
    fn = _mincore()
    if fn is None or rows.size == 0:
        return False
    row_bytes = vectors.shape[1] * vectors.itemsize
    page = mmap.PAGESIZE
    base = vectors.ctypes.data
    pick = rows[np.linspace(0, rows.size - 1, min(RESIDENCY_SAMPLE, rows.size)).astype(np.int64)]
    vec = np.zeros(row_bytes // page + 2, dtype=np.uint8)
    for r in pick.tolist():
        start = base + r * row_bytes
        lo = start - start % page
        n_pages = (start + row_bytes - lo + page - 1) // page
        if fn(lo, start + row_bytes - lo, vec.ctypes.data) != 0 or not np.all(vec[:n_pages] & 1):
            return False
    return True


def _prefetch(vectors: np.ndarray, rows: np.ndarray, skip_resident: bool = True) -> None:
    """Ask the kernel for the pages of ``vectors[rows]`` all at once (``MADV_WILLNEED``, asynchronous).

    Reading the rows of a memory-mapped file that is not in the page cache faults one page at a time: one
    disk round trip per candidate, in sequence (thousands per query). Announced together, the reads are
    queued in parallel and the faults that follow mostly find their pages. A no-op for arrays in RAM, for
    views of a memmap, where the platform has no ``madvise``, and (``skip_resident``) when a sample of the
    rows says they are in the page cache already (:func:`_rows_resident`).
    """
    mm = getattr(vectors, "_mmap", None)
    if (
        mm is None
        or vectors.base is not mm
        or not hasattr(mm, "madvise")
        or not hasattr(mmap, "MADV_WILLNEED")
        or rows.size == 0
    ):
        return
    if skip_resident and _rows_resident(vectors, rows):
        # a row that the sample missed then faults in alone, not with the 128 KiB read around it
        if hasattr(mmap, "MADV_RANDOM"):
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_RANDOM)
        return
    first = vectors.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 lies in the mapping
    size = len(mm)
    advise = mm.madvise
    with contextlib.suppress(OSError, ValueError):  # a hint: a refusal only skips the rest of it
        for a, b in _page_runs(first, vectors.shape[1] * vectors.itemsize, rows):
            advise(mmap.MADV_WILLNEED, a, min(b, size) - a)


def _page_runs(first: int, row_bytes: int, rows: np.ndarray) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) of a mapping that hold ``rows`` (sorted), starts aligned to pages, rows
    whose ranges touch or overlap merged into one range."""
    starts = first + rows.astype(np.int64) * row_bytes
    lo = starts // mmap.PAGESIZE * mmap.PAGESIZE
    hi = starts + row_bytes
    breaks = np.flatnonzero(lo[1:] > hi[:-1]) + 1
    return [
        (int(a), int(b))
        for a, b in zip(lo[np.r_[0, breaks]], hi[np.r_[breaks - 1, rows.size - 1]], strict=True)
    ]


#: Fewest candidate rows a re-rank hands to each extra thread (``_exact_scores``). Measured (4M x 2048-d
#: float16 rows in the page cache, 2 cores, 30 queries' own candidates; scratch of session 28): 10,000 rows
#: 19.1 -> 13.1 ms on 2 threads, 3000 rows 6.0 -> 4.8 ms, 1000 rows 3.0 -> 3.3 ms (slower: not split).
RERANK_ROWS_PER_THREAD = 1024

_RERANK_POOL_LOCK = threading.Lock()
_RERANK_POOL: dict = {}  # pid, workers, executor


def _rerank_pool(workers: int):
    """The engine's re-rank threads: created on the first split re-rank, grown when more are asked for (the
    smaller pool is shut down: its queued parts still run), made again in a forked child (whose copy has no
    threads behind it)."""
    import concurrent.futures

    with _RERANK_POOL_LOCK:
        pool = _RERANK_POOL
        if pool.get("pid") != os.getpid() or pool["workers"] < workers:
            if pool.get("pid") == os.getpid():
                pool["executor"].shutdown(wait=False)
            pool.update(
                pid=os.getpid(),
                workers=workers,
                executor=concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="skyloc-rerank"),
            )
        return pool["executor"]


def _exact_scores(
    vectors: np.ndarray, rows: np.ndarray, query: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """Inner products of ``query`` with ``vectors[rows]`` (rows sorted: sequential reads from a memmap).

    Blocks of rows are gathered and widened to float32 by torch (``index_select``, vectorised F16C
    conversion), the dot products taken by FAISS's ``fvec_inner_products_ny`` (the same sums, bit for bit, as
    the FAISS scorer before: one row's dot product is one sequence of float32 operations). Side by side
    (``bench/rerank_cost.py``, ``bench/results/rerank_cost_s27.txt``), 3000 warm rows of the 1M preset: 8.4 ms
    against 31.1 when numpy gathered through the memmap and FAISS's fp16 ScalarQuantizer widened (one value at
    a time); 10,000 rows at 4M: 17.8 against 75.2 ms.

    The rows are split into contiguous parts over up to ``threads`` threads (default: FAISS's thread count,
    the engine's budget), at least ``RERANK_ROWS_PER_THREAD`` rows a part: the calling thread scores the
    first, the engine's re-rank pool the others, each with torch held to its own thread. A single query's
    FAISS scan leaves the other core idle while one thread re-ranks; the gather of 4 KiB rows is bound by
    memory latency, which a second core hides. The scores do not depend on the split (each row's sum is its
    own).
    A numpy matmul is avoided: OpenBLAS threads keep spinning after the call and steal both cores from the
    next FAISS scan (at 4M, 147 against 101 ms a query; ``bench/results/rerank_cost_4M.txt``).
    """
    _prefetch(vectors, rows)
    d = vectors.shape[1]
    q = np.ascontiguousarray(query, dtype=np.float32).ravel()
    if q.size != d:  # FAISS reads d floats of it, whatever its size
        raise InputError(f"query has {q.size} dimensions, the re-rank vectors {d}")
    out = np.empty(rows.size, dtype=np.float32)
    if rows.size == 0:
        return out
    threads = faiss.omp_get_max_threads() if threads is None else threads
    # (other row sources, the ChunkedVectors of a build, are read on this thread only)
    parts = (
        max(1, min(int(threads), rows.size // RERANK_ROWS_PER_THREAD))
        if isinstance(vectors, np.ndarray)
        else 1
    )
    # parts of whole blocks (no short block in the middle of the rows)
    bounds = [
        min(rows.size, -(-rows.size * i // parts // _RERANK_BLOCK) * _RERANK_BLOCK) for i in range(parts + 1)
    ]
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if len(spans) == 1:
        _score_rows(vectors, rows, q, out)
        return out
    pool = _rerank_pool(len(spans) - 1)
    futures = [pool.submit(_score_rows, vectors, rows[a:b], q, out[a:b]) for a, b in spans[1:]]
    try:
        _score_rows(vectors, rows[spans[0][0] : spans[0][1]], q, out[spans[0][0] : spans[0][1]])
    finally:
        for f in futures:  # every part finished (or failed) before ``out`` is returned or dropped
            f.exception()
    for f in futures:
        f.result()
    return out


def _score_rows(vectors: np.ndarray, rows: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = q . vectors[rows[i]]`` in float32, on the calling thread (see :func:`_exact_scores`)."""
    d = vectors.shape[1]
    torch = _torch()
    # an ndarray view of a memmap (no subclass wrapping of every block); other row sources (ChunkedVectors
    # during a build) are read block by block through their own indexing
    plain = np.asarray(vectors) if isinstance(vectors, np.ndarray) else vectors
    takes = (
        isinstance(plain, np.ndarray)
        and plain.dtype in (np.float16, np.float32)
        and plain.dtype.isnative
        and min(plain.strides) >= 0
    )
    table = torch.from_numpy(plain) if takes else None
    idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    block = torch.empty((min(_RERANK_BLOCK, rows.size), d), dtype=torch.float32)
    with _torch_on_this_thread():
        for start in range(0, rows.size, _RERANK_BLOCK):
            part = idx[start : start + _RERANK_BLOCK]
            if table is None:  # rows torch does not take (not met with the engine's own files)
                wide = np.ascontiguousarray(plain[part.numpy()], dtype=np.float32)
            else:
                widened = block[: part.numel()]
                if table.dtype == torch.float32:
                    torch.index_select(table, 0, part, out=widened)
                else:
                    widened.copy_(torch.index_select(table, 0, part))
                wide = widened.numpy()
            res = out[start : start + part.numel()]
            faiss.fvec_inner_products_ny(
                faiss.swig_ptr(res), faiss.swig_ptr(q), faiss.swig_ptr(wide), d, part.numel()
            )


def _top_exact(
    vectors: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the best ``k`` of ``rows`` (unique, sorted) by exact inner product; ties by id."""
    s = _exact_scores(vectors, rows, query)
    take = min(k, rows.size)
    top = np.argpartition(-s, take - 1)[:take] if take < rows.size else np.arange(rows.size)
    top = top[np.lexsort((rows[top], -s[top]))]
    return s[top], rows[top]


#: FAISS's fast-scan IVF strategies (``IndexIVFFastScan.implem``): 0 lets FAISS choose, which splits the
#: work by query, so one query runs on one thread; 15 splits one query's lists over the threads. Measured
#: (150k x 2048-d, IVF256,PQ512x4fsr, all lists probed, 4000 candidates, 2 cores): one query 7.1 -> 3.6 ms
#: with 15, the same candidates (ties aside); a batch of 200 is faster with 0 (1.75 vs 2.6 ms a query).
FAST_SCAN_BY_QUERY, FAST_SCAN_BY_LIST = 0, 15


def _pick_fast_scan_strategy(index: faiss.Index, nq: int) -> None:
    """Set the fast-scan IVF layers of ``index`` to split fewer queries than threads by list, else by query.

    Set on every search (never restored): searches of one index from several threads at once may pick each
    other's strategy, which changes their speed, never their result.
    """
    implem = FAST_SCAN_BY_LIST if nq < faiss.omp_get_max_threads() else FAST_SCAN_BY_QUERY
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIVFFastScan):
            layer.implem = implem


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-d integer array by a sort: numpy 2.4's ``np.unique`` hashes first and sorts after,
    1.6 ms for 10,000 int64 ids against 0.08 ms here (a 4M single query re-ranks 10,000 candidates)."""
    out = np.sort(values)
    if out.size > 1:
        out = out[np.concatenate(([True], out[1:] != out[:-1]))]
    return out


#: A compressed index asks its codes for n/CANDIDATE_TIE_MARGIN more candidates than the n it re-ranks. Fast-scan
#: codes score coarsely: at 4M, 300-480 candidates share the 10,000th best score (scratch of session 29, 10
#: queries), and which of them FAISS keeps depended on its threads' timing: the same query re-ranked rows
#: that differed by 10-127 from run to run (so its results could too, and a repeated query read new rows
#: from disk). From n + n/8 candidates the best n are kept by score, then id: the same rows every time.
CANDIDATE_TIE_MARGIN = 8


def _best_candidates(
    scores: np.ndarray, ids: np.ndarray, n: int, higher_is_better: bool = True
) -> np.ndarray:
    """The ``n`` best ``ids`` by ``scores`` (ties by smaller id), sorted by id; -1 ids (no hit) ignored.

    Deterministic whenever the candidates hold every id scoring at least the ``n``-th best score, which
    FAISS's heaps and reservoirs guarantee when they were asked for more than ``n`` ids and the last of
    those scores below the ``n``-th (:data:`CANDIDATE_TIE_MARGIN`).
    """
    valid = ids >= 0
    s, found = scores[valid], ids[valid]
    if not higher_is_better:
        s = -s
    if found.size > n:
        nth = np.partition(s, found.size - n)[found.size - n]
        above = s > nth
        tied = np.flatnonzero(s == nth)
        keep = tied[np.argsort(found[tied], kind="stable")[: n - int(above.sum())]]
        found = np.concatenate([found[above], found[keep]])
    return _sorted_unique(found)


def _search_rerank(
    index: RerankIndex,
    q: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    nprobe: int | None,
    ef_search: int | None,
    rerank: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    nq = q.shape[0]
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    n_cand = min(index.ntotal, max(k, rerank if rerank is not None else index.rerank))
    if allowed is None and index.ntotal <= n_cand:
        allowed = np.arange(index.ntotal)
    if allowed is not None:
        allowed = _sorted_unique(allowed)
        allowed = allowed[allowed < index.ntotal]
        if allowed.size <= n_cand:  # a small area (or database): score every allowed vector exactly
            for i in range(nq):
                s, r = _top_exact(index.vectors, allowed, q[i], k)
                scores[i, : s.size], ids[i, : s.size] = s, r
            return scores, ids
    ivf = next((layer for layer in _layers(index.base) if isinstance(layer, faiss.IndexIVF)), None)
    if ivf is not None:  # probe lists holding >= RERANK_PROBE_MARGIN x n_cand vectors (few lists, small base)
        floor = math.ceil(RERANK_PROBE_MARGIN * n_cand * ivf.nlist / max(1, index.ntotal))
        nprobe = min(ivf.nlist, max(nprobe if nprobe is not None else ivf.nprobe, floor))
    # more than n_cand from the codes, so that the n_cand kept do not depend on how FAISS broke its ties
    n_scan = min(index.ntotal, n_cand + n_cand // CANDIDATE_TIE_MARGIN + 64)
    approx, cand = search(index.base, q, n_scan, allowed_ids=allowed, nprobe=nprobe, ef_search=ef_search)
    higher_is_better = index.base.metric_type != faiss.METRIC_L2
    for i in range(nq):
        rows = _best_candidates(approx[i], cand[i], n_cand, higher_is_better)
        if rows.size:
            s, r = _top_exact(index.vectors, rows, q[i], k)
            scores[i, : s.size], ids[i, : s.size] = s, r
    return scores, ids


def _write_rerank_vectors(vectors: np.ndarray, path: Path) -> None:
    """The full vectors as a float16 ``.npy`` at ``path``, atomically (temp file beside it, fsync, rename),
    converted in 256 MiB chunks (never a whole float32 or float16 copy in RAM)."""
    n, d = vectors.shape
    try:
        with atomic_path(path, durable=True) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
            chunk = max(1, _CHUNK_BYTES // (4 * d))
            for start in range(0, n, chunk):
                out[start : start + chunk] = np.asarray(vectors[start : start + chunk], dtype=np.float32)
                out.flush()
            del out
    except OSError as exc:
        if mapped := from_os_error(exc, f"writing {path}"):
            raise mapped from None
        raise


def _read_rerank_vectors(path: Path, base: faiss.Index) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable float16 vector file: {exc}") from None
    if vectors.dtype != np.float16 or vectors.shape != (base.ntotal, base.d):
        raise InputError(
            f"{path} holds {vectors.dtype} {vectors.shape} but its index holds {base.ntotal:,} x {base.d} "
            "vectors: the files of this compressed index do not belong together (rebuild it)"
        )
    return vectors


# ------------------------------------------------------------------------------------------------ files


def write_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write atomically: a temp file beside ``path``, fsync, rename over ``path``, fsync the directory.

    An interrupted or failed write leaves the previous file (or nothing) at ``path``, never a truncated
    index, and removes its temp file. An index read with mmap=True may be rewritten to its own path: the
    mapping keeps the old inode alive. The bytes go through a Python file, not FAISS's own: FAISS closes its
    file in a destructor that only prints a failed fclose, so a disk that fills on the last buffered block
    would leave a truncated index behind a success; here every write error (ENOSPC included) is raised.

    A :class:`RerankIndex` writes its vectors first, as float16, to :func:`rerank_file` (atomically too),
    then its candidate index to ``path``; an index folder holds both (index_store swaps the folder whole).
    """
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write index {final}: folder {folder} does not exist")
    if isinstance(index, RerankIndex):
        _write_rerank_vectors(index.vectors, rerank_file(final))
        index = index.base
    try:
        with atomic_path(final, durable=True) as tmp, open(tmp, "wb") as fh:
            writer = faiss.PyCallbackIOWriter(fh.write)
            try:
                faiss.write_index(index, writer)
            finally:
                del writer
            fh.flush()
    except OSError as exc:
        raise from_os_error(exc, f"writing index {final}") or InputError(
            f"cannot write index {final}: {exc.strerror or exc}"
        ) from None
    except RuntimeError as exc:
        raise InputError(f"cannot write index {final}: {_faiss_reason(exc)}") from None
    return final


def read_index(path: str | os.PathLike, mmap: bool = False) -> faiss.Index:
    """Read an index; ``mmap=True`` maps its storage from the file instead of loading it (read-only).

    FAISS 1.15's IO_FLAG_MMAP_IFC maps the vectors/codes of Flat, SQ, PQ, HNSW storage and IVF inverted
    lists zero-copy: reading an 8 GB index costs ~no RAM, the OS pages vectors in on first use (first
    searches are slower) and shares them between processes. Such an index must not be added to (FAISS
    aborts the process); :func:`add_vectors` refuses it.

    With a float16 vector file beside it (:func:`rerank_file`, written for a ``+rerank`` index) the result
    is a :class:`RerankIndex` whose vectors are memory-mapped (always: they are what stays on disk).
    """
    p = Path(path)
    if not p.is_file():
        raise IndexNotFoundError(f"no index file at {p}")
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    try:
        index = faiss.read_index(str(p), flags)
    except RuntimeError as exc:
        raise InputError(f"{p} is not a readable FAISS index: {_faiss_reason(exc)}") from None
    if mmap:
        _READ_ONLY.add(index)
    if rerank_file(p).is_file():
        return RerankIndex(index, _read_rerank_vectors(rerank_file(p), index))
    return index


def index_nbytes(index: faiss.Index, path: str | os.PathLike | None = None) -> int:
    """Serialised size of ``index`` in bytes (what write_index writes, ~ what it takes in RAM).

    With ``path`` of the written file, its size on disk (free). Otherwise the index is streamed through a
    byte-counting writer, which never holds the serialised copy: ``faiss.serialize_index`` would allocate
    a second 8 GB array for an 8 GB index.

    For a :class:`RerankIndex`, the candidate index only: its vectors stay on disk (memory-mapped).
    """
    if isinstance(index, RerankIndex):
        index = index.base
    if path is not None:
        return os.path.getsize(path)
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    try:
        faiss.write_index(index, writer)
    finally:
        del writer  # flushes its buffer through count()
    return total
