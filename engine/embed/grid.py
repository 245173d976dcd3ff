"""The feature grid of a raster, computed window by window with context, and kept only where needed.

Cell (i, j) covers raster pixels [j*s, (j+1)*s) x [i*s, (i+1)*s) (s = the backbone's stride); the grid has
ceil(width/s) x ceil(height/s) cells, the last ones hanging over the raster's edge. Windows of
``window_cells`` overlap so that every cell is taken from a window where it lies at least ``margin_cells``
from the window's edge (unless it is at the raster's own edge); see :class:`AxisPlan`.

Memory: nothing is allocated for the whole raster unless a caller asks for it (:meth:`FeatureGrid.ensure`
without a box, i.e. a heatmap). Points only need the windows around them (:meth:`FeatureGrid.region`);
computed windows are kept in a least-recently-used store bounded by ``max_bytes``, so a click on a
100000 x 100000-pixel raster costs a few windows, not the 17.5 GB grid. A whole grid larger than
``IN_MEMORY_BYTES`` goes to a memory-mapped file in a per-process scratch folder (see :func:`scratch_dir`)
that is removed when the grid is closed, when the process exits, and by the next Skyloc process when this
one was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from ..errors import DiskFullError, ImageTooLargeError, from_os_error
from ..progress import CancelToken, ProgressFn, no_progress
from .backbones import Backbone
from .raster import EmbedRaster

#: Whole grids larger than this go to a temporary memory-mapped file instead of RAM.
IN_MEMORY_BYTES = 2 << 30
#: Default bound on the windows one grid keeps (the cache usually sets a grid's bound to its own).
DEFAULT_MAX_BYTES = 1 << 30
#: Free space kept on the scratch file system beyond a memory-mapped grid (other writers need room too).
SCRATCH_MARGIN_BYTES = 256 << 20
#: Prefix of the per-process scratch folders in the temporary directory: ``skyloc-grids-<pid>``.
SCRATCH_PREFIX = "skyloc-grids-"
#: Folders that versions before the per-process scheme left behind (tempfile names, no pid in them).
_LEGACY_SCRATCH = re.compile(r"^skyloc-grid-[A-Za-z0-9_]{6,}$")
#: A legacy folder untouched this long belongs to no running heatmap.
_LEGACY_STALE_SECONDS = 24 * 3600


# --------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class AxisWindow:
    offset: int  # first cell of the window
    own_start: int  # cells [own_start, own_end) are taken from this window
    own_end: int


class AxisPlan(Sequence[AxisWindow]):
    """Windows along one axis whose owned ranges partition [0, n_cells), each owned cell >= margin inside.

    Windows step by ``window - 2 * margin``; the last one is flush with the end. Where two windows overlap,
    the split is in the middle of the overlap, so each side keeps at least ``margin`` cells of context.
    Computed arithmetically (O(1) memory and O(log n) look-ups): a raster that declares 10^10 pixels must
    not cost a list of millions of windows before anything is read.
    """

    def __init__(self, n_cells: int, window: int, margin: int) -> None:
        if window <= 2 * margin:
            raise ValueError(f"window {window} must exceed twice the margin {margin}")
        self.n, self.window, self.margin = int(n_cells), int(window), int(margin)
        self.step = window - 2 * margin
        if self.n <= self.window:
            self._regular, self._count = 1, 1
        else:
            self._regular = (self.n - self.window) // self.step + 1
            flush = (self._regular - 1) * self.step == self.n - self.window
            self._count = self._regular + (0 if flush else 1)

    def __len__(self) -> int:
        return self._count

    def offset(self, k: int) -> int:
        if self.n <= self.window:
            return 0
        return k * self.step if k < self._regular else self.n - self.window

    def own_end(self, k: int) -> int:
        if k >= self._count - 1:
            return self.n
        return (self.offset(k + 1) + self.offset(k) + self.window) // 2

    def own_start(self, k: int) -> int:
        return 0 if k == 0 else self.own_end(k - 1)

    @overload
    def __getitem__(self, k: int) -> AxisWindow: ...

    @overload
    def __getitem__(self, k: slice) -> list[AxisWindow]: ...

    def __getitem__(self, k: int | slice) -> AxisWindow | list[AxisWindow]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self._count))]
        if k < 0:
            k += self._count
        if not 0 <= k < self._count:
            raise IndexError(k)
        return AxisWindow(self.offset(k), self.own_start(k), self.own_end(k))

    def owner(self, cell: int) -> int:
        """The window that owns ``cell`` (clipped to the axis)."""
        lo, hi = 0, self._count - 1  # first k with own_end(k) > cell
        while lo < hi:
            mid = (lo + hi) // 2
            if self.own_end(mid) > cell:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def meeting(self, start: int, end: int) -> range:
        """Windows whose owned cells meet cells [start, end) (clipped to the axis)."""
        start, end = max(0, start), min(self.n, end)
        if end <= start:
            return range(0)
        return range(self.owner(start), self.owner(end - 1) + 1)


def plan_axis(n_cells: int, window: int, margin: int) -> list[AxisWindow]:
    """The windows of :class:`AxisPlan` as a list (small axes, tests)."""
    return list(AxisPlan(n_cells, window, margin))


# --------------------------------------------------------------------------------------------- scratch

_scratch_lock = threading.Lock()
_scratch: Path | None = None
_scratch_names = itertools.count()


def _pid_alive(pid: int) -> bool | None:
    """Whether a process runs with this pid (None: cannot tell on this platform)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import psutil
        except ImportError:
            return None
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_scratch(tmp: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove grid scratch folders of processes that are gone (killed, crashed); returns what was removed.

    ``skyloc-grids-<pid>`` folders are removed when no process has that pid; folders of older versions
    (``skyloc-grid-*``, no pid) when untouched for a day. Called when a process first needs scratch space;
    the service may call it at start-up.
    """
    root = Path(tmp or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        stale = False
        if name.startswith(SCRATCH_PREFIX) and name[len(SCRATCH_PREFIX) :].isdigit():
            pid = int(name[len(SCRATCH_PREFIX) :])
            stale = pid != os.getpid() and _pid_alive(pid) is False
        elif _LEGACY_SCRATCH.match(name):
            with contextlib.suppress(OSError):
                newest = max([entry.stat().st_mtime] + [p.stat().st_mtime for p in entry.iterdir()])
                stale = time.time() - newest > _LEGACY_STALE_SECONDS
        if stale and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def scratch_dir() -> Path:
    """This process's scratch folder for memory-mapped grids (created on first use, removed at exit)."""
    global _scratch
    with _scratch_lock:
        if _scratch is None:
            sweep_stale_scratch()
            path = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getpid()}"
            if path.is_dir() and not path.is_symlink():  # a dead process had our pid: its files are stale
                shutil.rmtree(path, ignore_errors=True)
            path.mkdir(mode=0o700, exist_ok=True)
            atexit.register(shutil.rmtree, path, True)
            _scratch = path
        return _scratch


def _allocate_memmap(shape: tuple[int, ...], what: str) -> tuple[np.ndarray, Path]:
    """A zeroed float32 memory map of ``shape`` in the scratch folder, its blocks reserved up front.

    Reserving the blocks (posix_fallocate) matters: a memory-mapped write that finds the disk full is a
    SIGBUS that kills the whole process, not an exception.
    """
    nbytes = 4 * math.prod(shape)
    folder = scratch_dir()
    free = shutil.disk_usage(folder).free
    if free < nbytes + SCRATCH_MARGIN_BYTES:
        raise DiskFullError(
            f"{what} needs {nbytes / 2**30:.1f} GiB of scratch space in {folder}, only "
            f"{free / 2**30:.1f} GiB are free (set TMPDIR to a larger disk)"
        )
    path = folder / f"grid-{next(_scratch_names)}.npy"
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            if hasattr(os, "posix_fallocate"):  # not on macOS or Windows
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise from_os_error(exc, f"allocating {what}") or exc from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return arr, path


# ------------------------------------------------------------------------------------------------ grid


class FeatureGrid:
    """Lazily computed (C, rows, cols) feature grid of one raster for one backbone.

    Two ways to hold it: windows (their owned cells) in an LRU store bounded by ``max_bytes`` (points), or
    the whole grid as one array once a caller asks for it (:meth:`ensure` without a box, :attr:`feat`);
    :meth:`trim` goes back from the second to the first.
    """

    def __init__(self, raster: EmbedRaster, backbone: Backbone, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        backbone.check(raster)
        self.raster = raster
        self.backbone = backbone
        self.max_bytes = int(max_bytes)
        s = backbone.stride
        self.rows, self.cols = math.ceil(raster.height / s), math.ceil(raster.width / s)
        win = backbone.window_cells
        margin = backbone.margin_cells
        if not backbone.fixed_window:  # a CNN takes a smaller input when the raster is small
            win_r, win_c = min(win, self.rows), min(win, self.cols)
        else:
            win_r = win_c = win
        self.win = (win_r, win_c)
        self.plan_rows = AxisPlan(self.rows, win_r, min(margin, (win_r - 1) // 2))
        self.plan_cols = AxisPlan(self.cols, win_c, min(margin, (win_c - 1) // 2))
        self._store: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # owned cells, LRU first
        self._stored_bytes = 0
        self._dense: np.ndarray | None = None
        self._dense_file: Path | None = None
        self._pinned: set[tuple[int, int]] = set()

    # -- size -----------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.backbone.channels, self.rows, self.cols)

    @property
    def dense_bytes(self) -> int:
        """Bytes the whole grid takes as one array."""
        return 4 * math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held now: the whole array when there is one, else the stored windows."""
        return self._dense.nbytes if self._dense is not None else self._stored_bytes

    @property
    def memory_mapped(self) -> bool:
        return self._dense_file is not None

    @property
    def computed(self) -> frozenset[tuple[int, int]]:
        """(row, column) indices of the windows held."""
        return frozenset(self._store)

    @property
    def done(self) -> np.ndarray:
        """Which windows are held, as a (row windows, column windows) array (small grids: tests, tools)."""
        n = len(self.plan_rows) * len(self.plan_cols)
        if n > 1 << 20:
            raise ValueError(f"{n} windows: use .computed on a grid this large")
        out = np.zeros((len(self.plan_rows), len(self.plan_cols)), bool)
        for i, j in self._store:
            out[i, j] = True
        return out

    @property
    def feat(self) -> np.ndarray:
        """The whole grid as one (C, rows, cols) array: computed windows filled in, zeros elsewhere.

        Allocates the whole grid (memory-mapped beyond ``IN_MEMORY_BYTES``): for heatmaps, tests and small
        rasters; points use :meth:`region`.
        """
        return self._densify()

    # -- lifecycle ------------------------------------------------------------------------------------
    def _drop_dense(self) -> None:
        self._dense = None
        if self._dense_file is not None:
            with contextlib.suppress(
                OSError
            ):  # still mapped (Windows): the exit hook or next sweep removes it
                self._dense_file.unlink(missing_ok=True)
            self._dense_file = None

    def close(self) -> None:
        """Forget everything (and remove a memory-mapped file now)."""
        self._store.clear()
        self._stored_bytes = 0
        self._drop_dense()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._drop_dense()

    def trim(self, max_bytes: int | None = None) -> None:
        """Hold at most ``max_bytes`` (default ``self.max_bytes``).

        A whole array over the bound (or memory-mapped, whatever its size) goes; the most recently used
        windows stay, as copies, within a quarter of the bound (the copies exist next to the array for a
        moment: a quarter keeps that peak small).
        """
        budget = self.max_bytes if max_bytes is None else int(max_bytes)
        if self._dense is not None and (self.memory_mapped or self._dense.nbytes > budget):
            keep: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
            total = 0
            for key in reversed(self._store):  # most recent first
                size = self._store[key].nbytes
                if total + size > budget // 4:
                    break
                keep[key] = np.array(self._store[key])  # a copy: the array it views goes away
                total += size
            self._store = OrderedDict(reversed(keep.items()))
            self._stored_bytes = total
            self._drop_dense()
        if self._dense is None:
            while self._store and self._stored_bytes > budget:
                _, arr = self._store.popitem(last=False)
                self._stored_bytes -= arr.nbytes

    # -- coordinates ----------------------------------------------------------------------------------
    def cell_coords(self, cols_px: np.ndarray, rows_px: np.ndarray) -> np.ndarray:
        """Pixel positions (0 = left/top edge of the raster) -> (N, 2) cell units (cell centres at integers)."""
        s = self.backbone.stride
        return np.stack([np.asarray(cols_px) / s - 0.5, np.asarray(rows_px) / s - 0.5], axis=1)

    def nearest_cell(self, point_xy: np.ndarray) -> tuple[int, int]:
        """(row, col) of the cell nearest to a point in cell units, clipped to the grid."""
        cx, cy = int(np.floor(point_xy[0] + 0.5)), int(np.floor(point_xy[1] + 0.5))
        return min(max(cy, 0), self.rows - 1), min(max(cx, 0), self.cols - 1)

    def owner(self, point_xy: np.ndarray) -> tuple[int, int]:
        """The window (row index, column index) owning the cell nearest to a point."""
        r, c = self.nearest_cell(point_xy)
        return self.plan_rows.owner(r), self.plan_cols.owner(c)

    def box_around(self, point_xy: np.ndarray, halo: int = 3) -> tuple[int, int, int, int]:
        """Cells [r0, r1) x [c0, c1) within ``halo`` of a point (cell units), clipped to the grid."""
        cx, cy = int(np.floor(point_xy[0] + 0.5)), int(np.floor(point_xy[1] + 0.5))
        return (
            max(0, cy - halo),
            min(self.rows, cy + halo + 1),
            max(0, cx - halo),
            min(self.cols, cx + halo + 1),
        )

    def _windows_for(self, r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, int]]:
        """Window indices whose owned cells meet cells [r0, r1) x [c0, c1)."""
        return list(itertools.product(self.plan_rows.meeting(r0, r1), self.plan_cols.meeting(c0, c1)))

    # -- computing ------------------------------------------------------------------------------------
    def _window(self, i: int, j: int) -> np.ndarray:
        """Run the backbone on window (i, j): the (C, own rows, own cols) cells it owns."""
        s = self.backbone.stride
        rows, cols = self.win
        wr, wc = self.plan_rows[i], self.plan_cols[j]
        pixels, _ = self.backbone.read(self.raster, wc.offset * s, wr.offset * s, cols * s, rows * s)
        feat = self.backbone.features(pixels)
        return np.ascontiguousarray(
            feat[
                :,
                wr.own_start - wr.offset : wr.own_end - wr.offset,
                wc.own_start - wc.offset : wc.own_end - wc.offset,
            ],
            dtype=np.float32,
        )

    def _keep(self, key: tuple[int, int], cells: np.ndarray) -> np.ndarray:
        """Hold a computed window (in the whole array when there is one); returns what is held."""
        if self._dense is not None:
            wr, wc = self.plan_rows[key[0]], self.plan_cols[key[1]]
            view = self._dense[:, wr.own_start : wr.own_end, wc.own_start : wc.own_end]
            view[:] = cells
            self._store[key] = view
            return view
        self._store[key] = cells
        self._stored_bytes += cells.nbytes
        if self._stored_bytes > self.max_bytes:  # least recently used first, never what the caller needs now
            for old in [k for k in self._store if k not in self._pinned and k != key]:
                self._stored_bytes -= self._store.pop(old).nbytes
                if self._stored_bytes <= self.max_bytes:
                    break
        return cells

    def _get(self, key: tuple[int, int]) -> np.ndarray | None:
        cells = self._store.get(key)
        if cells is not None:
            self._store.move_to_end(key)
        return cells

    def _compute(
        self, windows: Sequence[tuple[int, int]], progress: ProgressFn, cancel: CancelToken | None
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Each window's owned cells, held ones as they are and the others computed (and held).

        The windows asked for are pinned meanwhile: computing one never evicts another of the same request.
        """
        todo = sum(1 for key in windows if key not in self._store)
        n = 0
        self._pinned = set(windows)
        try:
            for key in windows:
                cells = self._get(key)
                if cells is None:
                    if cancel is not None:
                        cancel.check()
                    cells = self._keep(key, self._window(*key))
                    n += 1
                    progress(n / todo, f"features: window {n} of {todo}")
                yield key, cells
        finally:
            self._pinned = set()

    def _densify(self) -> np.ndarray:
        """The whole grid as one array (allocated now if needed), the held windows copied into it."""
        if self._dense is None:
            what = f"the feature grid of {self.raster.path} ({self.cols}x{self.rows} cells)"
            if self.dense_bytes > IN_MEMORY_BYTES:
                self._dense, self._dense_file = _allocate_memmap(self.shape, what)
            else:
                try:
                    self._dense = np.zeros(self.shape, np.float32)
                except MemoryError as exc:
                    raise ImageTooLargeError(
                        f"not enough memory for {what}: {self.dense_bytes / 2**30:.1f} GiB"
                    ) from exc
            old, self._store = self._store, OrderedDict()
            self._stored_bytes = 0
            for key, cells in old.items():
                self._keep(key, cells)
        return self._dense

    def ensure(
        self,
        cells: tuple[int, int, int, int] | None = None,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> None:
        """Compute the windows owning cells [r0, r1) x [c0, c1) that are not held yet.

        Without a box: the whole grid, held as one array (a heatmap); with one, the windows go to the store.
        """
        if cells is None:
            self._densify()
            cells = (0, self.rows, 0, self.cols)
        for _ in self._compute(self._windows_for(*cells), progress, cancel):
            pass

    def ensure_around(
        self,
        points_xy: np.ndarray,
        halo: int = 3,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> None:
        """Compute the windows for the cells within ``halo`` cells of each point (NILI reads +-2 cells)."""
        boxes = {self.box_around(p, halo) for p in np.asarray(points_xy)}
        windows = sorted({w for b in boxes for w in self._windows_for(*b)})
        for _ in self._compute(windows, progress, cancel):
            pass

    def region(
        self,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
    ) -> np.ndarray:
        """Cells [r0, r1) x [c0, c1) (clipped to the grid) as a new (C, h, w) array, computing what is missing.

        Costs the windows that own those cells, whatever the raster's size.
        """
        r0, r1, c0, c1 = max(0, r0), min(self.rows, r1), max(0, c0), min(self.cols, c1)
        out = np.empty((self.backbone.channels, max(0, r1 - r0), max(0, c1 - c0)), np.float32)
        for (i, j), cells in self._compute(self._windows_for(r0, r1, c0, c1), progress, cancel):
            wr, wc = self.plan_rows[i], self.plan_cols[j]
            a0, a1 = max(r0, wr.own_start), min(r1, wr.own_end)
            b0, b1 = max(c0, wc.own_start), min(c1, wc.own_end)
            out[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = cells[
                :, a0 - wr.own_start : a1 - wr.own_start, b0 - wc.own_start : b1 - wc.own_start
            ]
        return out
