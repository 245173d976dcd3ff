"""NILI: the fast path against the literal reference, and the wall time of a 4000x4000 heatmap.

    python bench/nili_speed.py [--points 2000] [--out bench/results/nili_speed.txt]
    python bench/nili_speed.py --skip-nili --side 10980 --repeat 1 --out bench/results/nili_speed_10980.txt

1. GAIR's sizes (12x12 grid of 768-d CROMA patch features, decoder Linear(6914 -> 768), random weights: the
   arithmetic does not depend on their values): the same points through ``nili_reference`` (the released
   algorithm, 4 decoder products of 6914 x 768 per point) and ``NiliField.embed`` (decoded once per cell,
   then 4 gathers per point). Max abs difference, points/s, speed ratio (decoding the cells included).
2. Cosine maps: reference = reference embeddings then cosine; fast = ``CosineField`` (per-cell scalars and
   2x2-block dot products).
3. ``engine.api.heatmap`` over a 4000x4000 (``--side``) RGB raster (the bundled NAIP sample mirrored into
   a mosaic) with the default model: wall time, peak RSS and its parts; then, in the same process on the
   same feature grid, the post-network part (cosine map + COG) the old way (pointwise cosine, deflate-6
   scratch file, deflate-6 COG) and the new way (separable cosine grid, raw scratch, deflate-1 COG with a
   2^-18 quantum), best of ``--repeat`` interleaved runs, with the max abs difference of the two files;
   and the new way at ``--resolution`` 2x and 4x coarser.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.embed.nili import NiliDecoder, NiliField, nili_reference  # noqa: E402


def timed(fn, *args):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def nili_rows(n_points: int, grid: int) -> list[str]:
    rng = np.random.default_rng(0)
    c = d = 768
    feat = rng.normal(size=(c, grid, grid)).astype(np.float32)
    dec = NiliDecoder(
        c,
        (rng.normal(size=(d, 9 * c + 2)) / np.sqrt(9 * c)).astype(np.float32),
        rng.normal(size=d).astype(np.float32) * 0.1,
    )
    pts = np.stack([rng.uniform(-0.5, grid - 0.5, n_points), rng.uniform(-0.5, grid - 0.5, n_points)], axis=1)
    ref, t_ref = timed(nili_reference, feat, pts, dec)

    def decoded_field() -> NiliField:  # NiliField decodes lazily: force it here, so it is timed apart
        f = NiliField(feat, dec)
        _ = f.cells
        return f

    field, t_decode = timed(decoded_field)
    fast, t_fast = timed(field.embed, pts)
    v = rng.normal(size=d)
    ref_cos = ref @ v / np.linalg.norm(ref, axis=1) / np.linalg.norm(v)
    cosf, t_prep = timed(field.cosine, v)
    cos, t_cos = timed(cosf, pts)
    rows = [
        f"grid {grid}x{grid}x{c}, decoder {d}x{9 * c + 2}, {n_points} random points",
        "| path | seconds | points/s | speed ratio vs reference | max abs diff |",
        "| --- | --- | --- | --- | --- |",
        f"| reference (released algorithm) | {t_ref:.3f} | {n_points / t_ref:,.0f} | 1 | - |",
        f"| fast embed (incl. decoding {grid * grid} cells: {t_decode:.3f} s) | {t_decode + t_fast:.3f} | "
        f"{n_points / (t_decode + t_fast):,.0f} | {t_ref / (t_decode + t_fast):,.0f}x | {np.abs(ref - fast).max():.2e} |",
        f"| fast embed, cells already decoded | {t_fast:.4f} | {n_points / t_fast:,.0f} | {t_ref / t_fast:,.0f}x | "
        f"{np.abs(ref - fast).max():.2e} |",
        f"| cosine map (incl. decode {t_decode:.3f} s + per-cell scalars {t_prep:.3f} s) | "
        f"{t_decode + t_prep + t_cos:.3f} | {n_points / (t_decode + t_prep + t_cos):,.0f} | "
        f"{t_ref / (t_decode + t_prep + t_cos):,.0f}x | {np.abs(ref_cos - cos).max():.2e} (cosine) |",
        f"| cosine map, per point only | {t_cos:.4f} | {n_points / t_cos:,.0f} | {t_ref / t_cos:,.0f}x | |",
    ]
    return rows


def big_raster(path: Path, side: int = 4000) -> Path:
    """The bundled NAIP sample mirrored into a side x side mosaic (public domain), written in row blocks.

    Row blocks: a 10980 x 10980 mosaic is 362 MB of pixels, which would otherwise be the bench's peak RSS.
    """
    if path.exists():
        return path
    with rasterio.open(ROOT / "sample" / "naip_2018.tif") as src:
        a = src.read([1, 2, 3])
        profile = src.profile
    tiles_y = [a, a[:, ::-1]]
    pattern = np.concatenate([np.concatenate([t, t[:, :, ::-1]], axis=2) for t in tiles_y], axis=1)
    cols = np.arange(side) % pattern.shape[2]
    profile.update(
        width=side,
        height=side,
        count=3,
        nodata=None,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    )
    profile.pop("photometric", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, side, 512):
            rows = np.arange(r0, min(side, r0 + 512)) % pattern.shape[1]
            block = np.ascontiguousarray(pattern[:, rows][:, :, cols])
            dst.write(block, window=rasterio.windows.Window(0, r0, side, block.shape[1]))
    return path


class _Timed:
    """Wraps a callable and adds its wall time up (to split a heatmap into its parts)."""

    def __init__(self, fn):  # noqa: ANN001
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def _post(field, r, stride: int, og, out: Path, *, pointwise: bool, cog) -> tuple[float, float]:  # noqa: ANN001
    """(cosine map seconds, writing seconds) of one post-network pass: strips of the cosine + the COG."""
    from engine.embed.actions import cosine_rows
    from engine.embed.heatmap_io import write_heatmap

    values = _Timed(cosine_rows(field, r, stride, og, pointwise=pointwise))
    t = time.perf_counter()
    write_heatmap(out, og, r.crs.to_wkt(), values, {}, cog=cog)
    return values.seconds, time.perf_counter() - t - values.seconds


def _max_abs_diff(a: Path, b: Path) -> tuple[float, bool]:
    """Max abs difference of two heatmaps over their valid pixels (read in strips), and equal nodata masks."""
    worst, same_mask = 0.0, True
    with rasterio.open(a) as da, rasterio.open(b) as db:
        for row0 in range(0, da.height, 512):
            win = rasterio.windows.Window(0, row0, da.width, min(512, da.height - row0))
            x, y = da.read(1, window=win), db.read(1, window=win)
            nx, ny = x == da.nodata, y == db.nodata
            same_mask &= bool(np.array_equal(nx, ny))
            if (~nx).any():
                worst = max(worst, float(np.abs(x - y)[~nx].max()))
    return worst, same_mask


def heatmap_rows(
    work: Path, side: int, reference: bool, coarser: list[float], repeat: int, scale_to: int = 0
) -> list[str]:
    """End to end with the fast path (peak RSS, split), then old vs new post-network side by side."""
    import resource
    import tracemalloc

    from engine import api
    from engine.embed import actions
    from engine.embed.cache import grid_for
    from engine.embed.heatmap_io import FAST_COG, REFERENCE_COG, output_grid
    from engine.embed.models import load_embedding_model

    raster = big_raster(work / f"mosaic_{side}.tif", side)
    model, t_load = timed(load_embedding_model, "default")
    stride = model.backbone.stride
    with rasterio.open(raster) as ds:
        at = ds.xy(side // 2, side // 2)
        px = ds.res[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    writer = _Timed(actions.write_heatmap)
    actions.write_heatmap = writer  # the post-network part of api.heatmap: cosine strips + COG
    t0 = time.perf_counter()
    res = api.heatmap(str(raster), str(work / f"heat_{side}.tif"), at=at, overwrite=True)
    total = time.perf_counter() - t0
    actions.write_heatmap = writer.fn
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    post = writer.seconds
    mpx = side * side / 1e6
    rows = [
        f"heatmap of {raster.name} ({side}x{side} px RGB, default model, output on the raster's grid: "
        f"{mpx:.0f} M pixels)",
        f"- model load (once per process): {t_load:.2f} s",
        f"- end to end (fast path): {total:.1f} s wall, peak RSS {rss:,.0f} MiB (before the call: "
        f"{rss_before:,.0f} MiB)",
        f"- features + query (encoder over {-(-side // stride)}^2 cells of {stride} px, windows with context, "
        f"and the per-cell scalars): {total - post:.1f} s",
        f"- cosine map + writing the COG: {post:.2f} s = {100 * post / total:.0f}% of the wall time "
        f"({mpx / post:.1f} M output pixels/s)",
        f"- similarity range {res.min:.3f}..{res.max:.3f}",
    ]
    network = total - post
    m = load_embedding_model("default")
    with grid_for(str(raster), m, None) as (r, grid):  # the grid the call above computed (cached)
        pp = r.to_pixels(np.asarray([at]))
        v = actions.embed_cells(grid, m.decoder, grid.cell_coords(pp.cols, pp.rows))[0]
        t = time.perf_counter()
        field = actions.NiliField(grid.feat, m.decoder).cosine(v)
        t_prep = time.perf_counter() - t
        og = output_grid(r, None)
        new, old = work / f"new_{side}.tif", work / f"old_{side}.tif"
        runs: dict[str, list[tuple[float, float]]] = {"new": [], "old": []}
        for _ in range(repeat):  # interleaved, best of each: the cores are shared, the load comes and goes
            runs["new"].append(_post(field, r, stride, og, new, pointwise=False, cog=FAST_COG))
            if reference:
                runs["old"].append(_post(field, r, stride, og, old, pointwise=True, cog=REFERENCE_COG))
        c_new, w_new = min(runs["new"], key=sum)
        rows += [
            "",
            f"post-network part side by side (same process, same feature grid, best of {repeat} interleaved "
            f"runs; per-cell scalars {t_prep:.2f} s in both)",
            "| path | cosine map (s) | writing the COG (s) | total (s) | share of the heatmap's wall time "
            "| max abs diff vs old |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        if reference:
            c_old, w_old = min(runs["old"], key=sum)
            diff, same = _max_abs_diff(old, new)
            rows.append(
                f"| old: pointwise cosine, deflate-6 scratch -> COG | {c_old:.2f} | {w_old:.2f} | "
                f"{c_old + w_old:.2f} | {100 * (c_old + w_old) / (network + c_old + w_old):.0f}% | - |"
            )
            note = f"{diff:.1e}" + ("" if same else " (nodata masks DIFFER)")
        else:
            c_old = w_old = float("nan")
            note = "(old path not run)"
        rows.append(
            f"| new: separable cosine grid, raw scratch -> COG deflate-1, 2^-18 quantum | {c_new:.2f} | "
            f"{w_new:.2f} | {c_new + w_new:.2f} | {100 * (c_new + w_new) / (network + c_new + w_new):.0f}% | "
            f"{note} |"
        )
        if reference:
            rows.append(
                f"| speed-up | {c_old / c_new:.0f}x | {w_old / w_new:.1f}x | "
                f"{(c_old + w_old) / (c_new + w_new):.1f}x | | |"
            )
        tracemalloc.start()  # numpy reports its buffers to tracemalloc: the post part's own peak
        _post(field, r, stride, og, new, pointwise=False, cog=FAST_COG)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        rows.append(
            f"- memory of the new post-network part (numpy buffers, tracemalloc peak): {peak:,.0f} MiB, against "
            f"{og.width * og.height * 4 / 2**20:,.0f} MiB for the map as one float32 array"
        )
        for k in coarser:  # --resolution k times coarser than the raster's pixels
            ogk = output_grid(r, px * k)
            out_k = work / f"new_{side}_x{k:g}.tif"
            ck, wk = min(
                (_post(field, r, stride, ogk, out_k, pointwise=False, cog=FAST_COG) for _ in range(repeat)),
                key=sum,
            )
            share = ogk.width * ogk.height / (og.width * og.height)
            rows.append(
                f"- --resolution {px * k:g} ({k:g}x coarser, {ogk.width}x{ogk.height} px = {100 * share:.1f}% "
                f"of the pixels): cosine {ck:.3f} s + COG {wk:.3f} s = {ck + wk:.3f} s "
                f"({100 * (ck + wk) / (c_new + w_new):.1f}% of the native grid's)"
            )
        if scale_to:
            rows += _scaling(work, grid.feat, v, field, r, stride, og, scale_to, repeat)
    return rows


def _scaling(work: Path, feat: np.ndarray, v: np.ndarray, field, r, stride: int, og, side: int, repeat: int):  # noqa: ANN001, ANN202
    """The new post-network part on this raster and on a side x side one, interleaved: cost per pixel.

    The big raster's feature grid is this one's mirrored (as its pixels are the sample's mirrored): the
    post-network part does not depend on where features come from, and no encoder pass is needed.
    """
    from engine.embed.heatmap_io import FAST_COG, output_grid
    from engine.embed.nili import NiliDecoder, NiliField
    from engine.embed.raster import EmbedRaster

    big = big_raster(work / f"mosaic_{side}.tif", side)
    cells = -(-side // stride)
    tile = np.concatenate([feat, feat[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[:, :, ::-1]], axis=2)
    reps = (1, -(-cells // tile.shape[1]), -(-cells // tile.shape[2]))
    feat_big = np.ascontiguousarray(np.tile(tile, reps)[:, :cells, :cells])
    del tile
    with EmbedRaster(big) as rb:
        field_big = NiliField(feat_big, NiliDecoder.identity(feat.shape[0])).cosine(v)
        og_big = output_grid(rb, None)
        small_runs, big_runs = [], []
        for _ in range(repeat):
            small_runs.append(
                _post(field, r, stride, og, work / "scale_small.tif", pointwise=False, cog=FAST_COG)
            )
            big_runs.append(
                _post(field_big, rb, stride, og_big, work / "scale_big.tif", pointwise=False, cog=FAST_COG)
            )
    (cs, ws), (cb, wb) = min(small_runs, key=sum), min(big_runs, key=sum)
    ps, pb = og.width * og.height, og_big.width * og_big.height
    return [
        "",
        f"scaling of the new post-network part (same process, interleaved, best of {repeat}; the {side}^2 "
        "grid is this one's mirrored)",
        "| output pixels | cosine map (s) | COG (s) | total (s) | ns per pixel (cosine / COG) |",
        "| --- | --- | --- | --- | --- |",
        f"| {og.width}x{og.height} | {cs:.2f} | {ws:.2f} | {cs + ws:.2f} | {1e9 * cs / ps:.0f} / {1e9 * ws / ps:.0f} |",
        f"| {og_big.width}x{og_big.height} ({pb / ps:.1f}x the pixels) | {cb:.2f} | {wb:.2f} | {cb + wb:.2f} | "
        f"{1e9 * cb / pb:.0f} / {1e9 * wb / pb:.0f} |",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--grid", type=int, default=12)
    ap.add_argument("--work", default="bench_out/nili")
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--skip-heatmap", action="store_true")
    ap.add_argument("--skip-nili", action="store_true", help="only the heatmap part")
    ap.add_argument("--side", type=int, default=4000, help="heatmap raster side in pixels (10980: a S2 tile)")
    ap.add_argument("--no-reference", action="store_true", help="skip the old post-network path (slow)")
    ap.add_argument("--coarser", default="2,4", help="also --resolution this many times coarser, e.g. 2,4")
    ap.add_argument("--repeat", type=int, default=3, help="post-network runs per path (best taken)")
    ap.add_argument("--scale-to", type=int, default=0, help="also time the post part on a SIDE^2 raster")
    args = ap.parse_args()
    import os

    lines = [f"# NILI speed ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores)", ""]
    if not args.skip_nili:
        lines += nili_rows(args.points, args.grid)
    print("\n".join(lines), flush=True)
    if not args.skip_heatmap:
        coarser = [float(k) for k in args.coarser.split(",") if k.strip()]
        rows = [
            "",
            *heatmap_rows(
                Path(args.work), args.side, not args.no_reference, coarser, args.repeat, args.scale_to
            ),
        ]
        print("\n".join(rows), flush=True)
        lines += rows
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
