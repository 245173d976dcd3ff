"""The default (effnet-lite1-gem + gray-clahe) against Lite0 + gray-clahe, the default before it, through the
engine on the ISS photos (issue 17 part 1), with interleaved timing.

Same pool and hit rule as bench/retrieval_iss.py (one index per model, built with ``api.index``). Each photo
is localized with both indexes, in alternating order, best of ``--repeats`` tries each, so load from other
work on a shared machine slows both alike; ms = encode + search, median over the photos.

    nice .venv/bin/python bench/retrieval_iss_default.py [--work /tmp/iss-default]
        > bench/results/retrieval_iss_default_lite1.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval_iss import load_photos, pool_folder  # noqa: E402

from engine import api  # noqa: E402
from engine.retrieval.index_store import open_index  # noqa: E402

MODELS = ("default", "effnet-lite0-gem")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="indexes are kept (and reused) here; default: a temporary folder")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    pool = pool_folder(photos, work)
    idx = {}
    for m in MODELS:
        out = work / f"index-{m}"
        if not (out / "manifest.json").exists():
            api.index([str(pool)], str(out), model=m, backend="onnx", exclude=["surrounding_*"])
        idx[m] = open_index(out)
        api.localize([str(photos[0]["photo"])], idx[m], top_k=10)  # warm-up: ONNX session, caches
    ms = {m: [] for m in MODELS}
    first: dict[str, dict[str, int | None]] = {m: {} for m in MODELS}
    for i, p in enumerate(photos):
        for m in MODELS if i % 2 == 0 else MODELS[::-1]:
            best = None
            for _ in range(args.repeats):
                res = api.localize([str(p["photo"])], idx[m], top_k=10).photos[0]
                t = res.encode_ms + res.search_ms
                best = t if best is None else min(best, t)
            ms[m].append(best)
            feet = idx[m].tiles.footprints
            if any(f.intersection(p["footprint"]).area > 0 for f in feet):
                hits = [feet[c.tile_id].intersection(p["footprint"]).area > 0 for c in res.candidates]
                first[m][p["id"]] = hits.index(True) + 1 if any(hits) else None
    print(
        f"ISS retrieval through the engine: {len(photos)} photos, {len(idx[MODELS[0]].tiles)} unique candidate"
    )
    print("mosaics x 4 rotations, ONNX Runtime on CPU; ms: encode + search per photo, median, interleaved")
    print(f"{'model':<18} {'model id':<46} {'n':>3} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'ms':>7} {'x':>5}")
    base = statistics.median(ms["effnet-lite0-gem"])
    for m in MODELS:
        f = list(first[m].values())
        r = [sum(v is not None and v <= n for v in f) / len(f) for n in (1, 5, 10)]
        med = statistics.median(ms[m])
        print(
            f"{m:<18} {idx[m].model_id:<46} {len(f):>3} {r[0]:6.3f} {r[1]:6.3f} {r[2]:6.3f} {med:7.1f} "
            f"{med / base:5.2f}"
        )
    ids = sorted(first[MODELS[0]])
    print("\nfirst hit rank per photo (- = none in the top 10):")
    print(f"{'model':<18} " + " ".join(f"{i[-6:]:>6}" for i in ids))
    for m in MODELS:
        print(f"{m:<18} " + " ".join(f"{first[m][i] or '-':>6}" for i in ids))
    tmp.cleanup()


if __name__ == "__main__":
    main()
