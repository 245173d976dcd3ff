"""GAIR's Neural Implicit Local Interpolation (NILI): an embedding at any coordinate of a feature grid.

A feature grid ``feat`` (C, H, W) has one vector per cell (a ViT patch, a CNN stride cell). For a query
point, the released GAIR code takes the 4 cells around it (the nearest cell of the point shifted by half a
cell in x and y), decodes each with ``Linear(9C + 2 -> D)`` of [3x3-unfolded feature, offset of the query
from that cell's centre], and blends the 4 outputs with LIIF's local-ensemble weights (the area of the
diagonally opposite rectangle, i.e. bilinear weights).

Two implementations:

- :func:`nili_reference` follows the released code literally (normalised [-1, 1] coordinates, nearest
  ``grid_sample`` on the unfolded tensor, the decoder on each concatenated 6914-vector). It is the
  specification the fast path is tested against; about 4 x (9C + 2) x D x 2 flops per point.
- :class:`NiliField` uses that the decoder is linear: ``W [u; r] + b = (W_z u + b) + W_r r``. The first term
  ``A`` is computed once per cell (:func:`decode_cells`), so a point costs 4 gathers of D floats plus a
  2-column product: ``z = sum_k w_k A[c_k] + W_r (sum_k w_k r_k)``. This is exact everywhere (also on the
  border strip where shifted queries are clamped), not only in the interior. For a cosine map against a
  fixed vector ``v`` (:meth:`NiliField.cosine`), ``v.z`` needs the per-cell scalars ``v.A`` and
  ``|z|^2`` needs the dot products between the 4 cells of a 2x2 block: tens of flops per point. On a
  heatmap's axis-aligned grid of points the weights factor per axis (:class:`AxisBlend`), and
  :meth:`CosineField.on_grid` blends those per-cell quantities along y at cell resolution, then along x
  per pixel: a handful of image operations per output pixel (:meth:`CosineField.__call__`, one point at
  a time, is kept as the reference).

Coordinates: ``x`` grows to the right and ``y`` down, in *cell units* with cell centres at integers
(a pixel column ``col`` of a raster cut in cells of ``s`` pixels is at ``x = col / s - 0.5``). The
decoder's offset input is the released code's ``(query - centre) * [W, H]`` in [-1, 1] coordinates, i.e.
twice the offset in cells; ``offset_order`` says whether the decoder reads it as (x, y) or (y, x) (the
released inference and training code disagree; see REFERENCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Shift of the query before the nearest-cell lookup (released code: 1e-6 in [-1, 1] coordinates).
EPS_SHIFT = 1e-6
#: Ensemble weight floor (released code adds 1e-9 to each area).
EPS_AREA = 1e-9
#: The 4 shifts in the released code's loop order (vx outer, vy inner).
SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True)
class NiliDecoder:
    """The decoder ``Linear(9C + 2 -> D)``; ``weight`` None means the identity-bilinear default.

    The identity-bilinear decoder passes the centre tap of the 3x3 unfolding through unchanged and ignores
    the offset (``W_z`` selects channel ``c*9 + 4``, ``W_r = 0``, ``b = 0``): NILI then reduces exactly to
    bilinear interpolation of cell-centred features (edges replicated). It is what an untrained model
    should do, and what the default model uses until trained NILI weights are given.
    """

    channels: int
    weight: np.ndarray | None = None  # (D, 9C + 2) float32, columns [unfold (c*9 + k)..., offset 0, offset 1]
    bias: np.ndarray | None = None  # (D,)
    offset_order: str = "xy"

    def __post_init__(self) -> None:
        if self.offset_order not in ("xy", "yx"):
            raise ValueError(f"offset_order must be 'xy' or 'yx', got {self.offset_order!r}")
        if self.weight is not None and self.weight.shape[1] != 9 * self.channels + 2:
            raise ValueError(
                f"decoder weight {self.weight.shape} does not fit {self.channels} channels "
                f"(expected (D, {9 * self.channels + 2}))"
            )

    @classmethod
    def identity(cls, channels: int) -> NiliDecoder:
        return cls(channels)

    @property
    def is_identity(self) -> bool:
        return self.weight is None

    @property
    def dim(self) -> int:
        return self.channels if self.weight is None else int(self.weight.shape[0])

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight (D, 9C + 2), bias (D,)) as explicit arrays, also for the identity decoder."""
        if self.weight is not None:
            bias = self.bias if self.bias is not None else np.zeros(self.dim, np.float32)
            return self.weight.astype(np.float32), bias.astype(np.float32)
        c = self.channels
        weight = np.zeros((c, 9 * c + 2), np.float32)
        weight[np.arange(c), np.arange(c) * 9 + 4] = 1.0
        return weight, np.zeros(c, np.float32)

    def offset_weight(self) -> np.ndarray:
        """``W_r`` (D, 2) with columns in (x, y) order, whatever order the decoder reads them in."""
        if self.weight is None:
            return np.zeros((self.dim, 2), np.float32)
        w_r = self.weight[:, -2:].astype(np.float32)
        return w_r if self.offset_order == "xy" else w_r[:, ::-1].copy()


# --------------------------------------------------------------------------------------------- reference


def _centres(n: int) -> torch.Tensor:
    """Cell centres in [-1, 1] (align_corners=False convention)."""
    return -1 + (2 * torch.arange(n, dtype=torch.float64) + 1) / n


def nili_reference(feat: np.ndarray, points_xy: np.ndarray, decoder: NiliDecoder) -> np.ndarray:
    """NILI as the released GAIR code computes it. ``feat`` (C, H, W), points (N, 2) in cell units -> (N, D).

    Slow on purpose (the 6914-wide decoder on each of the 4 gathered vectors): the reference for tests.
    """
    c, h, w = feat.shape
    weight, bias = decoder.dense()
    ft = torch.from_numpy(np.ascontiguousarray(feat, dtype=np.float32))[None]
    unfolded = F.unfold(ft, 3, padding=1).view(1, c * 9, h, w)
    pts = torch.from_numpy(np.asarray(points_xy, dtype=np.float64))
    # cell units -> the released code's [-1, 1] coordinates (x right, y down)
    q = torch.stack([(2 * pts[:, 0] + 1) / w - 1, (2 * pts[:, 1] + 1) / h - 1], dim=1)
    rx, ry = 1.0 / w, 1.0 / h  # half a cell
    preds, areas = [], []
    lin_w, lin_b = torch.from_numpy(weight), torch.from_numpy(bias)
    for vx, vy in SHIFTS:
        shifted = q.clone()
        shifted[:, 0] += vx * rx + EPS_SHIFT
        shifted[:, 1] += vy * ry + EPS_SHIFT
        shifted.clamp_(-1 + EPS_SHIFT, 1 - EPS_SHIFT)
        grid = shifted.float()[None, None]  # (1, 1, N, 2) as (x, y)
        f_k = F.grid_sample(unfolded, grid, mode="nearest", align_corners=False)[0, :, 0].T  # (N, 9C)
        # centre of the cell that grid_sample picked (same rounding: nearbyint on the unnormalised index)
        ix = torch.round(((shifted[:, 0].float() + 1) * w - 1) / 2).clamp(0, w - 1).double()
        iy = torch.round(((shifted[:, 1].float() + 1) * h - 1) / 2).clamp(0, h - 1).double()
        rel_x = (q[:, 0] - _centres(w)[ix.long()]) * w
        rel_y = (q[:, 1] - _centres(h)[iy.long()]) * h
        rel = torch.stack([rel_x, rel_y] if decoder.offset_order == "xy" else [rel_y, rel_x], dim=1)
        inp = torch.cat([f_k, rel.float()], dim=1)
        preds.append(inp @ lin_w.T + lin_b)
        areas.append((rel_x * rel_y).abs() + EPS_AREA)
    total = torch.stack(areas).sum(0)
    areas[0], areas[3] = areas[3], areas[0]
    areas[1], areas[2] = areas[2], areas[1]
    out = sum(p * (a / total).float()[:, None] for p, a in zip(preds, areas, strict=True))
    return out.numpy()


# ------------------------------------------------------------------------------------------------- fast


def decode_rows(feat: np.ndarray, decoder: NiliDecoder, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of ``A = W_z . unfold3x3(feat) + b``: (D, r1 - r0, W) float32.

    Reads only feature rows r0 - 1 .. r1 (zeros beyond the grid, as the released code's unfold pads), so a
    heatmap decodes a large (possibly memory-mapped) grid chunk by chunk instead of all at once.
    """
    c, h, w = feat.shape
    weight, bias = decoder.dense()
    a, b = max(0, r0 - 1), min(h, r1 + 1)
    slab = np.zeros((c, r1 - r0 + 2, w + 2), np.float32)
    slab[:, a - (r0 - 1) : b - (r0 - 1), 1:-1] = feat[:, a:b]
    acc = np.broadcast_to(bias[:, None], (decoder.dim, (r1 - r0) * w)).copy()
    for k in range(9):  # one (D, C) product per tap, k = ky*3+kx: never the 9C-wide unfolding
        ky, kx = divmod(k, 3)
        tap = np.ascontiguousarray(weight[:, k : 9 * c : 9])
        acc += tap @ slab[:, ky : ky + r1 - r0, kx : kx + w].reshape(c, -1)
    return acc.reshape(decoder.dim, r1 - r0, w)


def decode_cells(feat: np.ndarray, decoder: NiliDecoder, rows_per_chunk: int = 64) -> np.ndarray:
    """``A = W_z . unfold3x3(feat) + b`` for every cell: (C, H, W) -> (D, H, W) float32.

    Computed as 9 shifted products (one per tap) over row chunks, never materialising the 9C-wide unfolding.
    """
    if decoder.is_identity:
        return np.ascontiguousarray(feat, dtype=np.float32)
    _, h, w = feat.shape
    out = np.empty((decoder.dim, h, w), np.float32)
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        out[:, r0:r1] = decode_rows(feat, decoder, r0, r1)
    return out


@dataclass(frozen=True)
class Neighbours:
    """For N points: the 2 columns and 2 rows of the cells around them and the ensemble weights."""

    ix: np.ndarray  # (N, 2) int: cell column of the -x and +x shift
    iy: np.ndarray  # (N, 2) int: cell row of the -y and +y shift
    weights: np.ndarray  # (N, 4) float64 in SHIFTS order (already swapped: weight of the cell itself)
    offset: np.ndarray  # (N, 2) float64: sum_k w_k rel_k in (x, y)


def neighbours(points_xy: np.ndarray, width: int, height: int) -> Neighbours:
    """The released code's 4 shifted nearest-cell lookups and LIIF weights, vectorised (float32 rounding kept)."""
    pts = np.asarray(points_xy, dtype=np.float64)
    qx = (2 * pts[:, 0] + 1) / width - 1
    qy = (2 * pts[:, 1] + 1) / height - 1

    def lookup(q: np.ndarray, v: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        s = np.clip(q + v / n + EPS_SHIFT, -1 + EPS_SHIFT, 1 - EPS_SHIFT).astype(np.float32)
        idx = np.clip(np.rint(((s + 1) * n - 1) / 2), 0, n - 1).astype(np.int64)
        rel = (q - (-1 + (2 * idx + 1) / n)) * n
        return idx, rel

    ixm, rxm = lookup(qx, -1, width)
    ixp, rxp = lookup(qx, 1, width)
    iym, rym = lookup(qy, -1, height)
    iyp, ryp = lookup(qy, 1, height)
    rels = [(rxm, rym), (rxm, ryp), (rxp, rym), (rxp, ryp)]  # SHIFTS order
    areas = np.stack([np.abs(rx * ry) + EPS_AREA for rx, ry in rels], axis=1)
    weights = areas[:, ::-1] / areas.sum(axis=1, keepdims=True)  # swap 0<->3, 1<->2
    offset = np.stack(
        [
            sum(weights[:, k] * rels[k][0] for k in range(4)),
            sum(weights[:, k] * rels[k][1] for k in range(4)),
        ],
        axis=1,
    )
    return Neighbours(np.stack([ixm, ixp], 1), np.stack([iym, iyp], 1), weights, offset)


def _cells(nb: Neighbours) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row, col) of each of the 4 cells in SHIFTS order."""
    return [
        (nb.iy[:, 0], nb.ix[:, 0]),
        (nb.iy[:, 1], nb.ix[:, 0]),
        (nb.iy[:, 0], nb.ix[:, 1]),
        (nb.iy[:, 1], nb.ix[:, 1]),
    ]


class NiliField:
    """A decoded feature grid, queried at any point (fast path). Build once per grid and decoder.

    ``feat`` may be a part of a larger grid: ``origin`` (row, col) says where it lies in a grid of
    ``full_shape`` (rows, cols), and points are then in that grid's cell units. The 4 cells around each
    point are looked up in the full grid (the same rounding and edge clamping as on the whole grid, so the
    result is exactly the whole grid's) and must lie in the part, with one more cell around them for a
    trained decoder (its 3x3 neighbourhood): give the part 2 cells of margin around the points' cells.
    Decoding is lazy: :meth:`embed` decodes the part once, :meth:`cosine` chunk by chunk.
    """

    def __init__(
        self,
        feat: np.ndarray,
        decoder: NiliDecoder,
        decoded: np.ndarray | None = None,
        origin: tuple[int, int] = (0, 0),
        full_shape: tuple[int, int] | None = None,
    ) -> None:
        _, self.height, self.width = feat.shape
        self.feat = feat
        self.decoder = decoder
        self.origin = (int(origin[0]), int(origin[1]))
        self.full_shape = (self.height, self.width) if full_shape is None else tuple(full_shape)
        self._cells = decoded if decoded is not None else (feat if decoder.is_identity else None)
        self.w_r = decoder.offset_weight()  # (D, 2), (x, y)
        self._rows: np.ndarray | None = None  # (H*W, D) copy for fast gathers, made on first embed()

    @property
    def cells(self) -> np.ndarray:
        """A: (D, H, W), decoded on first use."""
        if self._cells is None:
            self._cells = decode_cells(self.feat, self.decoder)
        return self._cells

    def decoded_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of A (decoding only those rows when the whole part is not decoded)."""
        if self._cells is not None:
            return self._cells[:, r0:r1]
        return decode_rows(self.feat, self.decoder, r0, r1)

    @property
    def dim(self) -> int:
        return self.decoder.dim

    def embed(self, points_xy: np.ndarray) -> np.ndarray:
        """(N, 2) points in cell units (of the full grid) -> (N, D) float32 embeddings (not normalised)."""
        if self._rows is None:  # one vector per row: a point's 4 cells are 4 contiguous reads
            cells_ = self.cells
            self._rows = np.ascontiguousarray(cells_.reshape(cells_.shape[0], -1).T, dtype=np.float32)
        full_h, full_w = self.full_shape
        nb = neighbours(points_xy, full_w, full_h)
        r_off, c_off = self.origin
        pairs = [(r - r_off, c - c_off) for r, c in _cells(nb)]
        if any(
            len(r) and (r.min() < 0 or c.min() < 0 or r.max() >= self.height or c.max() >= self.width)
            for r, c in pairs
        ):
            raise ValueError("a point's cells lie outside the part of the grid given to NiliField")
        cells = np.stack([r * self.width + c for r, c in pairs], axis=1)  # (N, 4) flat cell indices
        w = nb.weights.astype(np.float32)
        out = nb.offset.astype(np.float32) @ self.w_r.T
        step = 1024  # points per block: the (n, 4, D) gather stays small (large temporaries cost page faults)
        for a in range(0, len(w), step):
            b = min(len(w), a + step)
            out[a:b] += np.matmul(w[a:b, None, :], self._rows[cells[a:b]])[:, 0]
        return out

    def cosine(self, vector: np.ndarray) -> CosineField:
        """Precompute what a cosine-similarity map against ``vector`` needs (one pass over the cells)."""
        return CosineField(self, np.asarray(vector, dtype=np.float64))


class CosineField:
    """cos(v, z(p)) at any point p for a fixed v, from per-cell scalars and 2x2-block dot products.

    ``z = sum_k w_k A_k + W_r s`` (s = sum_k w_k r_k), so ``v.z = sum_k w_k (v.A_k) + (W_r^T v).s`` and
    ``|z|^2 = w^T G w + 2 s.(sum_k w_k W_r^T A_k) + s^T (W_r^T W_r) s`` where G holds the dot products of
    the (at most) 4 distinct cells, which always lie in one 2x2 block.
    """

    def __init__(self, field: NiliField, vector: np.ndarray, rows_per_chunk: int = 64) -> None:
        if field.origin != (0, 0) or field.full_shape != (field.height, field.width):
            raise ValueError("a cosine map needs the whole grid, not a part of it")
        rows_of = field.decoded_rows
        if field.height == 1 or field.width == 1:  # blocks need 2x2 cells: replicate the single row/col
            padded = np.pad(
                field.cells, ((0, 0), (0, int(field.height == 1)), (0, int(field.width == 1))), "edge"
            )

            def rows_of(a: int, b: int) -> np.ndarray:
                return padded[:, a:b]

            h, w = padded.shape[1:]
        else:
            h, w = field.height, field.width
        self.width, self.height = field.width, field.height
        self.v_norm = float(np.linalg.norm(vector))
        w_r = field.w_r.astype(np.float64)
        self.vr = w_r.T @ vector  # (2,)
        self.rr = w_r.T @ w_r  # (2, 2)
        self.va = np.empty((h, w))  # v.A per cell
        self.ra = np.empty((2, h, w))  # W_r^T A per cell
        self.norm = np.empty((h, w))
        self.horiz = np.empty((h, w - 1))  # cell . right neighbour
        self.vert = np.empty((h - 1, w))  # cell . lower neighbour
        self.diag = np.empty((h - 1, w - 1))  # cell . lower-right
        self.anti = np.empty((h - 1, w - 1))  # right . lower
        for r0 in range(0, h, rows_per_chunk):  # float64 per chunk (with the next row): bounded memory
            r1 = min(h, r0 + rows_per_chunk)
            a = rows_of(r0, min(h, r1 + 1)).astype(np.float64)  # decoded chunk by chunk: bounded memory
            n = r1 - r0
            self.va[r0:r1] = np.einsum("d,dhw->hw", vector, a[:, :n])
            self.ra[:, r0:r1] = np.einsum("dk,dhw->khw", w_r, a[:, :n])
            self.norm[r0:r1] = np.einsum("dhw,dhw->hw", a[:, :n], a[:, :n])
            self.horiz[r0:r1] = np.einsum("dhw,dhw->hw", a[:, :n, :-1], a[:, :n, 1:])
            m = a.shape[1] - 1  # rows that have a lower neighbour in this chunk
            self.vert[r0 : r0 + m] = np.einsum("dhw,dhw->hw", a[:, :m], a[:, 1 : m + 1])
            self.diag[r0 : r0 + m] = np.einsum("dhw,dhw->hw", a[:, :m, :-1], a[:, 1 : m + 1, 1:])
            self.anti[r0 : r0 + m] = np.einsum("dhw,dhw->hw", a[:, :m, 1:], a[:, 1 : m + 1, :-1])

    def blend_x(self, xs: np.ndarray) -> AxisBlend:
        """The x half of a separable grid of points (cell units); reused by every strip of a heatmap."""
        return axis_blend(xs, self.width, self.va.shape[1])

    def blend_y(self, ys: np.ndarray) -> AxisBlend:
        """The y half of a separable grid of points (cell units)."""
        return axis_blend(ys, self.height, self.va.shape[0])

    def on_grid(self, xs: AxisBlend, ys: AxisBlend) -> np.ndarray:
        """Cosine at every (y, x) of a separable grid of points: (len(ys), len(xs)) float32.

        The fast path of a heatmap strip. The weights factor per axis, so the 2x2-block quantities are first
        blended along y at cell resolution (rows x cells: cheap), then gathered and blended along x per
        output pixel: 5 gathers and a dozen flops a pixel, against the pointwise path's per-point lookup
        and scatter. Equal to :meth:`__call__` on the same points (tested); the few columns or rows where
        the weights do not factor (``exact`` False) are computed by :meth:`__call__`.
        """
        by, a0, a1 = ys.lo, ys.w_lo[:, None], ys.w_hi[:, None]
        y1 = by + 1
        # along y, at cell resolution: (rows, cells) float64
        dot_c = a0 * self.va[by] + a1 * self.va[y1]
        sq_c = a0 * a0 * self.norm[by] + a1 * a1 * self.norm[y1] + 2 * a0 * a1 * self.vert[by]
        pair_c = (
            a0 * a0 * self.horiz[by] + a1 * a1 * self.horiz[y1] + a0 * a1 * (self.diag[by] + self.anti[by])
        )
        bx, x0, x1 = xs.lo, xs.w_lo, xs.w_hi
        # along x, per output pixel
        dot = x0 * np.take(dot_c, bx, axis=1)
        dot += x1 * np.take(dot_c, bx + 1, axis=1)
        sq = (x0 * x0) * np.take(sq_c, bx, axis=1)
        sq += (x1 * x1) * np.take(sq_c, bx + 1, axis=1)
        sq += (2 * x0 * x1) * np.take(pair_c, bx, axis=1)
        if np.any(self.vr) or np.any(self.rr) or np.any(self.ra):  # a trained decoder reads the offset
            sx, sy = xs.offset[None, :], ys.offset[:, None]
            ra0 = a0 * self.ra[0][by] + a1 * self.ra[0][y1]
            ra1 = a0 * self.ra[1][by] + a1 * self.ra[1][y1]
            cross = sx * (x0 * np.take(ra0, bx, axis=1) + x1 * np.take(ra0, bx + 1, axis=1))
            cross += sy * (x0 * np.take(ra1, bx, axis=1) + x1 * np.take(ra1, bx + 1, axis=1))
            dot += sx * self.vr[0] + sy * self.vr[1]
            sq += 2 * cross
            sq += self.rr[0, 0] * sx * sx + 2 * self.rr[0, 1] * sx * sy + self.rr[1, 1] * sy * sy
        np.maximum(sq, 0.0, out=sq)
        np.sqrt(sq, out=sq)
        sq *= self.v_norm
        pos = sq > 0
        np.divide(dot, sq, out=dot, where=pos)
        dot[~pos] = 0.0
        out = dot.astype(np.float32)
        bad_x, bad_y = np.flatnonzero(~xs.exact), np.flatnonzero(~ys.exact)
        # rare: weights that do not factor (see AxisBlend), pointwise on those lines only
        if len(bad_x) and len(ys.coords):
            out[:, bad_x] = self(_grid_points(xs.coords[bad_x], ys.coords)).reshape(len(ys.coords), -1)
        if len(bad_y) and len(xs.coords):
            out[bad_y, :] = self(_grid_points(xs.coords, ys.coords[bad_y])).reshape(len(bad_y), -1)
        return out

    def __call__(self, points_xy: np.ndarray) -> np.ndarray:
        """(N, 2) points in cell units -> (N,) cosine similarity (float32). The pointwise (reference) path."""
        nb = neighbours(points_xy, self.width, self.height)
        rows_all, cols_all = self.va.shape
        by = np.clip(nb.iy[:, 0], 0, rows_all - 2)
        bx = np.clip(nb.ix[:, 0], 0, cols_all - 2)
        local = np.zeros((len(by), 4))  # weights collapsed onto the block's cells (0 UL, 1 UR, 2 LL, 3 LR)
        dot = np.zeros(len(by))
        cross = np.zeros(len(by))
        s = nb.offset
        for k, (r, c) in enumerate(_cells(nb)):
            wk = nb.weights[:, k]
            np.add.at(local, (np.arange(len(by)), (r - by) * 2 + (c - bx)), wk)
            dot += wk * self.va[r, c]
            cross += wk * (self.ra[0, r, c] * s[:, 0] + self.ra[1, r, c] * s[:, 1])
        dot += s @ self.vr
        w0, w1, w2, w3 = local.T
        y1, x1 = by + 1, bx + 1
        sq = (
            w0 * w0 * self.norm[by, bx]
            + w1 * w1 * self.norm[by, x1]
            + w2 * w2 * self.norm[y1, bx]
            + w3 * w3 * self.norm[y1, x1]
            + 2 * w0 * w1 * self.horiz[by, bx]
            + 2 * w2 * w3 * self.horiz[y1, bx]
            + 2 * w0 * w2 * self.vert[by, bx]
            + 2 * w1 * w3 * self.vert[by, x1]
            + 2 * w0 * w3 * self.diag[by, bx]
            + 2 * w1 * w2 * self.anti[by, bx]
        )
        sq += 2 * cross + np.einsum("ni,ij,nj->n", s, self.rr, s)
        denom = np.sqrt(np.maximum(sq, 0.0)) * self.v_norm
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
        return cos.astype(np.float32)


@dataclass(frozen=True)
class AxisBlend:
    """NILI's neighbour lookup along one axis, for sample positions on a separable grid.

    Why separable: a heatmap samples NILI on an axis-aligned grid of points, and the lookup of the -/+
    shifted cells and their offsets along x depends on x only (along y, on y only). The ensemble weights
    ``|r_x r_y| + EPS_AREA`` are then products of per-axis weights up to ``EPS_AREA``; where the per-axis
    offsets sum to almost nothing (a point within hundredths of a cell of the outermost cell centres,
    which a raster's own grid never samples) that floor matters, and ``exact`` is False there: those
    columns or rows go through the pointwise path.
    """

    lo: np.ndarray  # (n,) int: first cell of the 2-cell block holding both shifted cells
    w_lo: np.ndarray  # (n,) float64: weight collapsed onto cell ``lo``
    w_hi: np.ndarray  # (n,) float64: weight collapsed onto cell ``lo + 1``
    offset: np.ndarray  # (n,) float64: ``sum_k w_k r_k`` along this axis (what ``W_r`` multiplies)
    exact: np.ndarray  # (n,) bool: the separable weights equal the released code's (within 2e-6)
    coords: np.ndarray  # (n,) float64: the positions themselves (cell units)


#: Per-axis offset sum below which the separable weights are not trusted (EPS_AREA relative to it^2).
SEPARABLE_MIN_SPAN = 0.05


def axis_blend(coords: np.ndarray, n_cells: int, block_cells: int) -> AxisBlend:
    """The per-axis part of :func:`neighbours` (same float32 rounding) for ``coords`` in cell units.

    ``block_cells`` is the grid size the 2-cell blocks live in (``n_cells``, or 2 for a single-cell axis
    that :class:`CosineField` pads by replication).
    """
    q = (2 * np.asarray(coords, np.float64) + 1) / n_cells - 1

    def lookup(v: int) -> tuple[np.ndarray, np.ndarray]:
        s = np.clip(q + v / n_cells + EPS_SHIFT, -1 + EPS_SHIFT, 1 - EPS_SHIFT).astype(np.float32)
        idx = np.clip(np.rint(((s + 1) * n_cells - 1) / 2), 0, n_cells - 1).astype(np.int64)
        return idx, (q - (-1 + (2 * idx + 1) / n_cells)) * n_cells

    im, rm = lookup(-1)
    ip, rp = lookup(1)
    span = np.abs(rm) + np.abs(rp)
    ok = span >= SEPARABLE_MIN_SPAN
    safe = np.where(ok, span, 1.0)
    wm = np.where(ok, np.abs(rp) / safe, 0.5)  # the -shift cell weighs the +shift side's area (LIIF swap)
    wp = 1.0 - wm
    lo = np.clip(im, 0, block_cells - 2)
    exact = ok & (ip - im >= 0) & (ip - im <= 1) & (im >= lo) & (ip <= lo + 1)
    w_lo = wm * (im == lo) + wp * (ip == lo)
    w_hi = wm * (im == lo + 1) + wp * (ip == lo + 1)
    return AxisBlend(lo, w_lo, w_hi, wm * rm + wp * rp, exact, np.asarray(coords, np.float64))


def scalar_on_grid(grid: np.ndarray, xs_cells: np.ndarray, ys_cells: np.ndarray) -> np.ndarray:
    """NILI with the identity decoder of a one-channel (H, W) grid on the separable grid ys x xs (cell units).

    That is bilinear interpolation with edges replicated, sampled per axis as :meth:`CosineField.on_grid`
    does (a location heatmap: a coarse grid of similarities brought to every output pixel); the lines
    where the weights do not factor go through :meth:`NiliField.embed`.
    """
    h, w = grid.shape
    padded = np.pad(np.asarray(grid, np.float64), ((0, int(h == 1)), (0, int(w == 1))), "edge")
    xs, ys = axis_blend(xs_cells, w, padded.shape[1]), axis_blend(ys_cells, h, padded.shape[0])
    rows = ys.w_lo[:, None] * padded[ys.lo] + ys.w_hi[:, None] * padded[ys.lo + 1]
    out = (xs.w_lo * np.take(rows, xs.lo, axis=1) + xs.w_hi * np.take(rows, xs.lo + 1, axis=1)).astype(
        np.float32
    )
    bad_x, bad_y = np.flatnonzero(~xs.exact), np.flatnonzero(~ys.exact)
    if len(bad_x) or len(bad_y):
        field = NiliField(np.asarray(grid, np.float32)[None], NiliDecoder.identity(1))
        if len(bad_x) and len(ys.coords):
            out[:, bad_x] = field.embed(_grid_points(xs.coords[bad_x], ys.coords))[:, 0].reshape(
                len(ys.coords), -1
            )
        if len(bad_y) and len(xs.coords):
            out[bad_y, :] = field.embed(_grid_points(xs.coords, ys.coords[bad_y]))[:, 0].reshape(
                len(bad_y), -1
            )
    return out


def _grid_points(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys) * len(xs), 2) points of the grid ys x xs, row-major (x varies fastest)."""
    return np.stack([np.tile(xs, len(ys)), np.repeat(ys, len(xs))], axis=1)


def bilinear_reference(feat: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of cell-centred features, edges replicated (torch grid_sample): (N, C)."""
    c, h, w = feat.shape
    pts = np.asarray(points_xy, dtype=np.float64)
    grid = np.stack([(2 * pts[:, 0] + 1) / w - 1, (2 * pts[:, 1] + 1) / h - 1], axis=1)
    out = F.grid_sample(
        torch.from_numpy(np.ascontiguousarray(feat, np.float32))[None],
        torch.from_numpy(grid).float()[None, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[0, :, 0].T.numpy()
