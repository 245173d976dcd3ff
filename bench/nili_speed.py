"""NILI: the fast path against the literal reference, and the wall time of a 4000x4000 heatmap.

    python bench/nili_speed.py [--points 2000] [--out bench/results/nili_speed.txt]

1. GAIR's sizes (12x12 grid of 768-d CROMA patch features, decoder Linear(6914 -> 768), random weights: the
   arithmetic does not depend on their values): the same points through ``nili_reference`` (the released
   algorithm, 4 decoder products of 6914 x 768 per point) and ``NiliField.embed`` (decoded once per cell,
   then 4 gathers per point). Max abs difference, points/s, speed ratio (decoding the cells included).
2. Cosine maps: reference = reference embeddings then cosine; fast = ``CosineField`` (per-cell scalars and
   2x2-block dot products).
3. ``engine.api.heatmap`` over a 4000x4000 RGB raster (the bundled NAIP sample mirrored into a mosaic) with
   the default model: wall time and its parts.
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
    field, t_decode = timed(NiliField, feat, dec)
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
    """The bundled NAIP sample mirrored into a side x side mosaic (public domain)."""
    if path.exists():
        return path
    with rasterio.open(ROOT / "sample" / "naip_2018.tif") as src:
        a = src.read([1, 2, 3])
        profile = src.profile
    tiles_y = [a, a[:, ::-1]]
    row = np.concatenate([np.concatenate([t, t[:, :, ::-1]], axis=2) for t in tiles_y], axis=1)
    reps = (1, -(-side // row.shape[1]), -(-side // row.shape[2]))
    mosaic = np.tile(row, reps)[:, :side, :side]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(mosaic))
    return path


def heatmap_rows(work: Path) -> list[str]:
    from engine import api
    from engine.embed.models import load_embedding_model

    raster = big_raster(work / "mosaic_4000.tif")
    model, t_load = timed(load_embedding_model, "default")
    stride = model.backbone.stride
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(f: float, msg: str) -> None:
        if msg.startswith("features") and "features" not in marks:
            marks["features"] = time.perf_counter()
        if msg.startswith("heatmap: row") and "write" not in marks:
            marks["write"] = time.perf_counter()

    with rasterio.open(raster) as ds:
        at = ds.xy(2000, 2000)
    res = api.heatmap(str(raster), str(work / "heat_4000.tif"), at=at, progress=progress)
    total = time.perf_counter() - t0
    feat_end = marks.get("write", t0 + total)
    return [
        f"heatmap of {raster.name} (4000x4000 px RGB, default model, output on the raster's grid: 16 M pixels)",
        f"- model load (once per process): {t_load:.2f} s",
        f"- wall time: {total:.1f} s ({16e6 / total / 1e6:.2f} M output pixels/s)",
        f"- features + query (encoder over {-(-res.width // stride)}^2 cells of {stride} px, in windows with "
        f"context): {feat_end - t0:.1f} s",
        f"- cosine map + writing the COG: {t0 + total - feat_end:.1f} s",
        f"- similarity range {res.min:.3f}..{res.max:.3f}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--grid", type=int, default=12)
    ap.add_argument("--work", default="bench_out/nili")
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--skip-heatmap", action="store_true")
    args = ap.parse_args()
    import os

    lines = [f"# NILI speed ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores)", ""]
    lines += nili_rows(args.points, args.grid)
    print("\n".join(lines), flush=True)
    if not args.skip_heatmap:
        rows = ["", *heatmap_rows(Path(args.work))]
        print("\n".join(rows), flush=True)
        lines += rows
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
