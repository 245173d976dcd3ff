"""The descriptors of an index build, read from its chunk files instead of held in RAM.

A build encodes its tiles in chunks and saves each one in the staging folder (that is how it resumes).
The FAISS build then reads the descriptors: training takes a sample of rows, adding goes through them in
256 MiB slices, and a compressed index writes them once more as float16. None of that needs them all in
memory at once, so :class:`ChunkedVectors` offers those reads over the chunk files, memory-mapped: at
AstroLoc's world scale (3.5M vectors of 2048-d, 29 GB as float32) the driver never holds more than a slice,
where concatenating the chunks needed the whole 29 GB (twice, during the copy).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError


class ChunkedVectors:
    """Rows of several ``(n_i, dim)`` float32 ``.npy`` files seen as one ``(sum n_i, dim)`` array.

    Supports what :func:`engine.retrieval.faiss_index.build` and ``write_index`` read: ``shape``, ``dtype``,
    ``ndim``, ``len()``, a slice of rows (``a[i:j]``, step 1) and a 1-d integer array of rows (``a[rows]``,
    any order); each returns a new float32 ndarray. ``np.asarray(a)`` would load every row and is refused.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]):
        if not paths:
            raise InputError("no descriptor chunk to read")
        self.paths = [Path(p) for p in paths]
        self._parts: list[np.ndarray] = []
        for p in self.paths:
            try:
                part = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"descriptor chunk {p} is unreadable: {exc}") from None
            if part.ndim != 2 or part.dtype != np.float32:
                raise InputError(f"descriptor chunk {p} holds {part.dtype} {part.shape}, not float32 rows")
            if self._parts and part.shape[1] != self._parts[0].shape[1]:
                raise InputError(
                    f"descriptor chunk {p} is {part.shape[1]}-d, the others {self._parts[0].shape[1]}-d"
                )
            self._parts.append(part)
        sizes = np.array([len(p) for p in self._parts], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.shape = (int(self._starts[-1]), int(self._parts[0].shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ChunkedVectors({self.shape[0]:,} x {self.shape[1]} float32 in {len(self.paths)} files)"

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001 (numpy protocol)
        raise TypeError(
            "ChunkedVectors would load every row into memory: read slices (a[i:j]) or rows (a[idx])"
        )

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        n, d = self.shape
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("ChunkedVectors reads row slices with step 1 only")
            out = np.empty((max(0, stop - start), d), dtype=np.float32)
            if stop <= start:
                return out
            first = int(np.searchsorted(self._starts, start, side="right")) - 1
            pos = start
            for i in range(first, len(self._parts)):
                lo, hi = int(self._starts[i]), int(self._starts[i + 1])
                if lo >= stop:
                    break
                a, b = max(pos, lo), min(stop, hi)
                out[a - start : b - start] = self._parts[i][a - lo : b - lo]
                pos = b
            return out
        rows = np.asarray(key)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise IndexError("ChunkedVectors takes a row slice or a 1-d array of row numbers")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row out of range for {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        out = np.empty((rows.size, d), dtype=np.float32)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            out[sel] = self._parts[i][rows[sel] - self._starts[i]]
        return out
