"""Retrieval benchmark on real astronaut photos (../shared/data/iss).

Pools every unique candidate mosaic (not the `surrounding_*` images) into one index, queries every photo,
and counts a hit at N when one of the top-N tiles overlaps the photo's true footprint (positive area of
intersection, i.e. iou_with_query > 0). Reports recall@1/5/10 over the photos that have a positive in the
pool, and per-photo latency (encode + search, median over photos after one warm-up) per model and backend.

    .venv/bin/python bench/retrieval_iss.py [--models default,astroloc-random] [--backends torch,onnx]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import api  # noqa: E402
from engine.geo.xyz import parse_xyz_name  # noqa: E402
from engine.index_store import open_index  # noqa: E402

ISS = ROOT.parent / "shared" / "data" / "iss"


def load_photos() -> list[dict]:
    photos = []
    for folder in sorted(p for p in ISS.iterdir() if p.is_dir()):
        meta = json.loads((folder / "meta.json").read_text())
        footprint = shapely.Polygon([(lon, lat) for lat, lon in meta["query"]["footprint_latlon"]])
        photos.append(
            {
                "id": folder.name,
                "photo": folder / meta["query_file"],
                "footprint": footprint,
                "candidates": [folder / c["file"] for c in meta["candidates"]],
            }
        )
    return photos


def pool_candidates(photos: list[dict], into: Path) -> int:
    """Symlink each unique candidate mosaic (by z/row/col) into one folder: one XYZ source."""
    seen = set()
    for p in photos:
        for f in p["candidates"]:
            zyx = parse_xyz_name(f.name)
            if zyx in seen:
                continue
            seen.add(zyx)
            (into / f.name).symlink_to(f)
    return len(seen)


def run(model: str, backend: str, photos: list[dict], pool: Path, work: Path) -> dict:
    index_dir = work / f"index-{model}"
    t0 = time.perf_counter()
    if not (index_dir / "manifest.json").exists():
        # ONNX Runtime builds faster on a CPU and gives the same descriptors (cosine >= 0.9999 vs torch).
        api.index([str(pool)], str(index_dir), model=model, backend="onnx", exclude=["surrounding_*"])
    build_s = time.perf_counter() - t0
    idx = open_index(index_dir)
    hits = {1: 0, 5: 0, 10: 0}
    n_pos, lat = 0, []
    per_photo = []
    api.localize([str(photos[0]["photo"])], idx, top_k=10, backend=backend)  # warm-up (ONNX export, caches)
    for p in photos:
        res = api.localize([str(p["photo"])], idx, top_k=10, backend=backend).photos[0]
        lat.append(res.encode_ms + res.search_ms)
        overlaps = [
            idx.tiles.footprints[c.tile_id].intersection(p["footprint"]).area > 0 for c in res.candidates
        ]
        has_positive = any(f.intersection(p["footprint"]).area > 0 for f in idx.tiles.footprints)
        first = next((i + 1 for i, o in enumerate(overlaps) if o), None)
        per_photo.append({"id": p["id"], "has_positive": has_positive, "first_hit_rank": first})
        if has_positive:
            n_pos += 1
            for n in hits:
                hits[n] += first is not None and first <= n
    return {
        "model": model,
        "backend": backend,
        "model_id": idx.model_id,
        "tiles": len(idx.tiles),
        "vectors": int(idx.faiss.ntotal),
        "photos_with_positive": n_pos,
        **{f"recall@{n}": hits[n] / max(n_pos, 1) for n in hits},
        "latency_ms_median": statistics.median(lat),
        "latency_ms_p90": sorted(lat)[int(0.9 * (len(lat) - 1))],
        "index_build_s": build_s,
        "per_photo": per_photo,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,astroloc-random")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--work", help="keep indexes here (default: a temporary folder)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    if not ISS.is_dir():
        sys.exit(f"skipped: {ISS} not found (the benchmark needs ../shared/data/iss)")
    photos = load_photos()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pool = work / "pool"
        if not pool.exists():
            pool.mkdir()
            pool_candidates(photos, pool)
        rows = [
            run(m, b, photos, pool, work) for m in args.models.split(",") for b in args.backends.split(",")
        ]
    print(f"\nISS retrieval: {len(photos)} photos, {rows[0]['tiles']} unique candidate mosaics x 4 rotations")
    print(
        f"{'model':<18} {'backend':<7} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'n_pos':>5} {'ms/photo':>9} {'p90':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<18} {r['backend']:<7} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f} "
            f"{r['photos_with_positive']:5d} {r['latency_ms_median']:9.1f} {r['latency_ms_p90']:7.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
