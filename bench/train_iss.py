"""Does `skyloc train` help? Leave-photos-out cross-validation on the ISS photos (../shared/data/iss).

The pooled index of every candidate mosaic is the one bench/retrieval_iss.py measures (a hit at N when a top-N
tile overlaps the photo's true footprint). The photos are split into ``--folds`` folds; for each fold a
footprint layer is written from the *other* photos' true footprints (meta.json), as if the analyst had placed
them with Skyloc, the default model is fine-tuned on it and on the pool's tiles (``api.train``), the pool is
indexed again with the fine-tuned model, and the held-out photos are queried against the full pool. The
untrained default is measured on the same held-out photos. The report is printed and written to
``--report`` (default bench/results/train_iss.txt):

    .venv/bin/python bench/train_iss.py [--folds 4] [--steps 30] [--work /tmp/train-iss]

Caveat: tiles overlapping a held-out photo can be a training photo's positive too when two photos show the
same place; the held-out *photo* is never seen in training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from retrieval_iss import ISS, load_photos, pool_folder  # noqa: E402

from engine import api  # noqa: E402
from engine.retrieval.index_store import open_index  # noqa: E402
from engine.vector_io import write_polygons  # noqa: E402


def first_hits(index_dir: Path, photos: list[dict]) -> dict[str, int | None]:
    """Rank of the first top-10 tile overlapping the true footprint, per photo (None: no hit)."""
    idx = open_index(index_dir)
    out = {}
    for p in photos:
        res = api.localize([str(p["photo"])], idx, top_k=10, backend="onnx").photos[0]
        hits = [idx.tiles.footprints[c.tile_id].intersection(p["footprint"]).area > 0 for c in res.candidates]
        out[p["id"]] = next((i + 1 for i, h in enumerate(hits) if h), None)
    return out


def recalls(first: dict[str, int | None], ids: list[str]) -> tuple[float, float, float]:
    n = max(len(ids), 1)
    return tuple(sum(first[i] is not None and first[i] <= k for i in ids) / n for k in (1, 5, 10))  # type: ignore[return-value]


def fmt(r: tuple[float, float, float]) -> str:
    return " ".join(f"R@{k} {v:.3f}" for k, v in zip((1, 5, 10), r, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--run-folds", type=int, help="run only the first N folds (a quick check)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-photos", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-blocks", type=int)
    ap.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2: the CV is run once per seed")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "train_iss.txt")
    args = ap.parse_args()
    if not ISS.is_dir():
        sys.exit(f"{ISS} is absent")
    work = args.work or Path(tempfile.mkdtemp(prefix="train-iss-"))
    work.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    pool = pool_folder(photos, work)
    base_index = work / "index-default"
    t0 = time.perf_counter()
    if not (base_index / "manifest.json").exists():
        api.index([str(pool)], str(base_index), exclude=["surrounding_*"])
    idx = open_index(base_index)
    positives = [
        p for p in photos if any(f.intersection(p["footprint"]).area > 0 for f in idx.tiles.footprints)
    ]
    ids = [p["id"] for p in positives]
    base_first = first_hits(base_index, positives)
    lines = [
        f"# bench/train_iss.py, {dt.date.today()}: leave-photos-out CV, {args.folds} folds, "
        f"{args.steps} steps x {args.batch_photos} photos, lr {args.lr}",
        f"pool: {len(idx.tiles)} tiles; photos with a positive in the pool: {len(ids)} of {len(photos)}",
        f"untrained default, all photos: {fmt(recalls(base_first, ids))}",
    ]
    print("\n".join(lines), flush=True)
    folds = [ids[i :: args.folds] for i in range(args.folds)][: args.run_folds or args.folds]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: list[tuple[float, float, float]] = []
    held_all: list[str] = []
    for seed in seeds:
        held_all = []
        trained_first: dict[str, int | None] = {}
        for k, held in enumerate(folds):
            train_photos = [
                p for p in photos if p["id"] not in held
            ]  # every other photo, with or without positive
            fp = work / f"fold{k}" / "footprints.gpkg"
            fp.parent.mkdir(exist_ok=True)
            write_polygons(
                fp,
                [p["footprint"] for p in train_photos],
                {
                    "photo": [str(p["photo"]) for p in train_photos],
                    "status": ["localized"] * len(train_photos),
                },
                layer="footprints",
                overwrite=True,
            )
            t1 = time.perf_counter()
            res = api.train(
                str(fp),
                str(base_index),
                str(work / f"fold{k}" / "model"),
                steps=args.steps,
                batch_photos=args.batch_photos,
                lr=args.lr,
                train_blocks=args.train_blocks,
                seed=seed,
                overwrite=True,
            )
            train_s = time.perf_counter() - t1
            ft_index = work / f"fold{k}" / "index"
            shutil.rmtree(ft_index, ignore_errors=True)  # the previous seed's
            api.index([str(pool)], str(ft_index), model=res.out, exclude=["surrounding_*"])
            first = first_hits(ft_index, [p for p in positives if p["id"] in held])
            trained_first.update(first)
            held_all += held
            line = (
                f"seed {seed} fold {k}: {len(held)} held out, trained on {res.photos} photos ({res.pairs} pairs), "
                f"{train_s:.0f} s on {res.device}, loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}; "
                f"untrained {fmt(recalls(base_first, held))} | trained {fmt(recalls(first, held))}"
            )
            lines.append(line)
            print(line, flush=True)
        per_seed.append(recalls(trained_first, held_all))
        seed_lines = [
            f"seed {seed}, held-out photos pooled over folds ({len(held_all)}): trained {fmt(per_seed[-1])}",
            "  per photo (first hit rank untrained -> trained; - = none in top 10): "
            + ", ".join(f"{i} {base_first[i] or '-'}->{trained_first[i] or '-'}" for i in held_all),
        ]
        lines += seed_lines
        print("\n".join(seed_lines), flush=True)
    arr = np.array(per_seed)
    summary = [
        f"held-out photos ({len(held_all)}), {len(seeds)} seed(s):",
        f"  untrained default : {fmt(recalls(base_first, held_all))}",
        "  trained, mean     : " + fmt(tuple(arr.mean(0))),
        "  trained, min..max : "
        + ", ".join(
            f"R@{k} {lo:.3f}..{hi:.3f}" for k, lo, hi in zip((1, 5, 10), arr.min(0), arr.max(0), strict=True)
        ),
        f"total {time.perf_counter() - t0:.0f} s",
    ]
    lines += summary
    print("\n".join(summary), flush=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
