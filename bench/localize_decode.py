"""``localize --footprint`` on the ISS photos: each photo decoded once (retrieval hands its pixels on) vs twice.

    python bench/localize_decode.py [--top-k 2] [--work bench_out/localize_decode] [--out FILE]

The index pools the ISS candidate mosaics (as bench/retrieval_iss.py does, default model, ONNX). The same
``api.localize_footprints`` call runs twice in one process, side by side: with ``KEEP_DECODED_BYTES = 0``
(the photo is decoded again for matching: what happened before) and with the default budget. Counted:
calls and seconds of ``read_image`` (the decoding), wall time, and whether the footprints are the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from retrieval_iss import ISS, load_photos, pool_folder  # noqa: E402

from engine import api  # noqa: E402


def run(photos: list[str], index: Path, out: Path, top_k: int, keep_bytes: int) -> dict:
    """One localize --footprint run; read_image wrapped to count the decodes."""
    calls, seconds = 0, 0.0
    real = api.read_image

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal calls, seconds
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            calls += 1
            seconds += time.perf_counter() - t

    api.read_image, saved = counting, api.KEEP_DECODED_BYTES
    api.KEEP_DECODED_BYTES = keep_bytes
    try:
        t = time.perf_counter()
        fps = api.localize_footprints(
            photos, str(index), out=str(out), top_k=top_k, overwrite=True, resume=False
        )
        wall = time.perf_counter() - t
    finally:
        api.read_image, api.KEEP_DECODED_BYTES = real, saved
    return {
        "decodes": calls,
        "decode_s": seconds,
        "wall_s": wall,
        "result": [(f.photo, f.status, f.tile_id, f.corners_lonlat) for f in fps],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--work", default="bench_out/localize_decode")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()
    if not ISS.is_dir():
        sys.exit(f"skipped: {ISS} not found (the benchmark needs ../shared/data/iss)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    items = load_photos()
    pool = pool_folder(items, work)
    index = work / "index-default"
    if not (index / "manifest.json").exists():
        api.index([str(pool)], str(index), model="default", backend="onnx", exclude=["surrounding_*"])
    photos = [str(p["photo"]) for p in items]
    api.localize(photos[:1], str(index), top_k=1)  # warm-up: encoder, ONNX export
    twice = run(photos, index, work / "twice.gpkg", args.top_k, 0)
    once = run(photos, index, work / "once.gpkg", args.top_k, api.KEEP_DECODED_BYTES)
    lines = [
        f"# localize --footprint on {len(photos)} ISS photos, top-k {args.top_k} (one process, side by side)",
        "| photos decoded | read_image calls | decoding (s) | wall time (s) |",
        "| --- | --- | --- | --- |",
        f"| twice (before) | {twice['decodes']} | {twice['decode_s']:.3f} | {twice['wall_s']:.1f} |",
        f"| once (retrieval hands the pixels on) | {once['decodes']} | {once['decode_s']:.3f} | "
        f"{once['wall_s']:.1f} |",
        f"saved: {twice['decode_s'] - once['decode_s']:.3f} s of decoding "
        f"({1000 * (twice['decode_s'] - once['decode_s']) / len(photos):.1f} ms per photo); "
        f"same footprints: {twice['result'] == once['result']}",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
