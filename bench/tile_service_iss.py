"""Retrieval through an XYZ tile service vs the mosaic-folder index, on real astronaut photos (issue 14).

The ISS candidate mosaics (../shared/data/iss, the pool of bench/retrieval_iss.py: 512-px images of 4x4
Sentinel-2 cloudless tiles) are cut back into their XYZ tiles, each 128-px block a PNG tile of its own
(lossless, not resampled: the service's mosaics are the folder's pixels), and served by a real HTTP server on loopback (tests/tile_server.py). The area of each pooled mosaic is
indexed through the URL (at its zoom, 4x4 mosaics on the global 50%-overlap grid, by default only mosaics
whose 16 tiles all exist; each grid mosaic once); the sources share one MBTiles cache. The same photos
are then localized against both indexes; a hit at N is a top-N tile that overlaps the true footprint.

    .venv/bin/python bench/tile_service_iss.py [--work /tmp/tiles-iss] [--out bench/results/tile_service_iss.txt]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from retrieval_iss import ISS, load_photos, pool_folder  # noqa: E402
from tile_server import TileServer  # noqa: E402

from engine import api  # noqa: E402
from engine.geo.search_area import SearchArea  # noqa: E402
from engine.geo.xyz import mosaic_bounds_lonlat, parse_xyz_name  # noqa: E402
from engine.imagery.photos import read_image  # noqa: E402
from engine.imagery.tile_source import TileMosaicSource, prepare_tile_sources  # noqa: E402
from engine.retrieval.index_store import build_index, open_index  # noqa: E402

SPAN = 4
TILE = 128  # the pool's blocks as they are: resampling them to 256 px changed the descriptors
EPS = 1e-7  # keeps an area edge that lies on a tile edge from reaching into the next tile


def cut_pool(pool: Path) -> dict[tuple[int, int, int], bytes]:
    """The XYZ tiles of every pooled mosaic, as 128-px PNG tiles (first mosaic wins where two overlap)."""
    tiles: dict[tuple[int, int, int], bytes] = {}
    for f in sorted(pool.iterdir()):
        z, row, col = parse_xyz_name(f.name)  # type: ignore[misc]
        rgb = read_image(f)
        step = rgb.shape[0] // SPAN
        for dy in range(SPAN):
            for dx in range(SPAN):
                key = (z, col + dx, row + dy)
                if key in tiles:
                    continue
                block = rgb[dy * step : (dy + 1) * step, dx * step : (dx + 1) * step]
                buf = io.BytesIO()
                Image.fromarray(block).resize((TILE, TILE), Image.Resampling.BICUBIC).save(buf, "PNG")
                tiles[key] = buf.getvalue()
    return tiles


def mosaic_areas(pool: Path) -> list[tuple[int, SearchArea]]:
    """(zoom, bbox) of every pooled mosaic: the places the service is asked to index."""
    out = []
    for f in sorted(pool.iterdir()):
        z, row, col = parse_xyz_name(f.name)  # type: ignore[misc]
        w, s, e, n = mosaic_bounds_lonlat(z, row, col, SPAN)
        out.append((z, SearchArea(bbox=(w + EPS, s + EPS, e - EPS, n - EPS))))
    return out


def one_source(sources: list[TileMosaicSource]) -> TileMosaicSource:
    """The first source, holding the specs of all (they share one cache), each grid mosaic once."""
    seen, specs = set(), []
    for src in sources:
        for spec in src.specs():
            if spec.xyz not in seen:
                seen.add(spec.xyz)
                specs.append(spec)
    sources[0]._specs = specs
    return sources[0]


def recall(index_dir: Path, photos: list[dict]) -> dict:
    idx = open_index(index_dir)
    hits, n_pos = {1: 0, 5: 0, 10: 0}, 0
    for p in photos:
        res = api.localize([str(p["photo"])], idx, top_k=10).photos[0]
        overlaps = [
            idx.tiles.footprints[c.tile_id].intersection(p["footprint"]).area > 0 for c in res.candidates
        ]
        if not any(f.intersection(p["footprint"]).area > 0 for f in idx.tiles.footprints):
            continue
        n_pos += 1
        first = next((i + 1 for i, o in enumerate(overlaps) if o), None)
        for n in hits:
            hits[n] += first is not None and first <= n
    return {"tiles": len(idx.tiles), "n_pos": n_pos, **{f"R@{n}": hits[n] / max(n_pos, 1) for n in hits}}


def _same_mosaics(a, b) -> list[float]:
    """Cosine (rotation 0) between the descriptors of the mosaics both indexes hold (same z/bounds)."""

    def keyed(idx) -> dict:
        return {
            (int(idx.tiles.zoom[i]), *np.round(idx.tiles.native_bounds[i], 2)): i
            for i in range(len(idx.tiles))
        }

    ka, kb = keyed(a), keyed(b)
    va = a.faiss.reconstruct_n(0, a.faiss.ntotal)
    vb = b.faiss.reconstruct_n(0, b.faiss.ntotal)
    return [float(va[ka[k] * a.n_rotations] @ vb[kb[k] * b.n_rotations]) for k in ka.keys() & kb.keys()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="keep indexes and the tile cache here (default: a temporary folder)")
    ap.add_argument("--min-coverage", type=float, default=1.0, help="share of a mosaic's tiles needed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tile_service_iss.txt"))
    args = ap.parse_args()
    if not ISS.is_dir():
        sys.exit(f"skipped: {ISS} not found (the benchmark needs ../shared/data/iss)")
    photos = load_photos()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pool = pool_folder(photos, work)
        t0 = time.perf_counter()
        tiles = cut_pool(pool)
        cut_s = time.perf_counter() - t0
        lines = [
            f"ISS tile-service retrieval: {len(photos)} photos, {len(list(pool.iterdir()))} pooled mosaics"
        ]
        lines.append(f"cut into {len(tiles)} XYZ tiles of {TILE} px in {cut_s:.1f} s, served on loopback")

        t0 = time.perf_counter()
        folder_dir = work / "index-folder"
        if not (folder_dir / "manifest.json").exists():
            api.index([str(pool)], str(folder_dir), exclude=["surrounding_*"])
        folder_s = time.perf_counter() - t0

        with TileServer(tiles) as srv:
            cache = work / "tiles.mbtiles"
            sources = [
                TileMosaicSource(
                    srv.url, zooms=[z], area=area, tile_cache=cache, min_coverage=args.min_coverage
                )
                for z, area in mosaic_areas(pool)
            ]
            t0 = time.perf_counter()
            progress = prepare_tile_sources(sources)
            fetch_s = time.perf_counter() - t0
            requests, ok = len(srv.log), sum(s == 200 for _, s in srv.log)
            url_dir = work / "index-url"
            t0 = time.perf_counter()
            if not (url_dir / "manifest.json").exists():
                build_index([one_source(sources)], api.get_encoder(), url_dir, progress=progress)
            url_s = time.perf_counter() - t0
            for s in sources:
                s.close()
        lines.append(
            f"tile service: {len(sources)} areas (one per pooled mosaic), min_coverage {args.min_coverage}, {requests} requests ({ok} tiles, "
            f"{requests - ok} 404) in {fetch_s:.1f} s, {srv.connections} connections (one pool per area)"
        )
        folder_idx, url_idx = open_index(folder_dir), open_index(url_dir)
        pooled = [parse_xyz_name(f.name) for f in sorted(pool.iterdir())]
        odd = sum(r % 2 or c % 2 for _, r, c in pooled)  # type: ignore[misc]
        same = _same_mosaics(folder_idx, url_idx)
        lines.append(
            f"pooled mosaics off the even grid (not reproduced as such by the service): {odd} of {len(pooled)}; "
            f"{len(same)} mosaics in both indexes: descriptor cosine (rotation 0) median {np.median(same):.4f}, "
            f"min {np.min(same):.4f} (the service's tiles are the pooled 128-px blocks as lossless PNGs)"
        )
        rows = [
            ("mosaic folder", recall(folder_dir, photos), folder_s),
            ("tile service", recall(url_dir, photos), url_s),
        ]
        lines.append(
            f"{'index':<14} {'tiles':>6} {'n_pos':>5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'build s':>8}"
        )
        for name, r, s in rows:
            lines.append(
                f"{name:<14} {r['tiles']:6d} {r['n_pos']:5d} {r['R@1']:6.3f} {r['R@5']:6.3f} {r['R@10']:6.3f} {s:8.0f}"
            )
        extra = len(url_idx.tiles) - len(same)
        lines.append(
            f"the service index holds the {len(same)} pooled mosaics (same z/row/col and bounds) and {extra} more "
            "grid mosaics whose 16 tiles all exist (neighbouring pooled mosaics); 'build s' is 0 for an index "
            "reused from an earlier run in --work"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
