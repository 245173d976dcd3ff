"""Footprint estimation on the real ISS data (../shared/data/iss): successes, false localizations, IoU.

For each photo, its candidates (cand_*.jpg, in the published retrieval order, each file once) are placed
from their XYZ names (exact Web-Mercator bounds) and matched with engine.footprint.estimate, the ground
being every mosaic of the photo's folder (candidates + the surrounding_* context image).

Success (the issue's definition): accepted, IoU(predicted, true) >= 0.5 and the true footprint's centre
inside the prediction. A false localization is any accepted footprint that is not a success.

Printed side by side: the baseline a new user would try first, plain SIFT + MAGSAC on the 512 px images
(the first, unguided pass of our own pipeline: the candidate with most inliers is its pick), and the
calibration data (verified-match counts on right vs wrong places).

Run: python bench/footprint_iss.py [--photos ID,ID] [--out bench/results/footprint_iss.txt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from pyproj import CRS, Transformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.footprint.coregister import CoregParams  # noqa: E402
from engine.footprint.estimate import GroundCandidate, estimate  # noqa: E402
from engine.footprint.ground import MosaicGround, MosaicImage  # noqa: E402
from engine.imageio import read_image  # noqa: E402
from engine.tiles.xyz_mosaic import XyzMosaicSource  # noqa: E402

ISS = ROOT.parent / "shared" / "data" / "iss"


def local(lonlat: np.ndarray, lat0: float, lon0: float) -> shapely.Polygon:
    """A polygon of (lon, lat) points in a metric azimuthal-equidistant frame centred near it."""
    t = Transformer.from_crs(
        CRS.from_epsg(4326),
        CRS.from_proj4(f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +units=m"),
        always_xy=True,
    )
    x, y = t.transform(lonlat[:, 0], lonlat[:, 1])
    return shapely.Polygon(np.c_[x, y])


def run_photo(folder: Path, params: CoregParams) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    truth = np.array(meta["query"]["footprint_latlon"], dtype=float)[:, ::-1]  # -> (lon, lat)
    lat0, lon0 = truth[:, 1].mean(), truth[:, 0].mean()
    tpoly = local(truth, lat0, lon0)
    src = XyzMosaicSource(folder)
    ground = MosaicGround([MosaicImage(s.source, s.bounds) for s in src.specs()], name=folder.name)
    by_file = {Path(s.source).name: s for s in src.specs()}
    positive = {c["file"]: c["iou_with_query"] > 0 for c in meta["candidates"]}
    cands, seen = [], set()
    for c in sorted(meta["candidates"], key=lambda c: c["rank"]):
        if c["file"] in seen or c["file"] not in by_file:
            continue
        seen.add(c["file"])
        cands.append(GroundCandidate(c["file"], ground, by_file[c["file"]].bounds, rank=len(cands) + 1))
    photo_path = next(folder.glob("query*.jpg"))
    rgb = read_image(photo_path)
    t0 = time.perf_counter()
    fp = estimate(str(photo_path), rgb, cands, params)
    seconds = time.perf_counter() - t0
    row = {
        "photo": folder.name,
        "has_positive": any(positive.values()),
        "status": fp.status,
        "reason": fp.reason,
        "seconds": seconds,
        "verified": fp.verified,
        "checks": [
            {
                "file": c.label,
                "positive": positive.get(c.label, False),
                "verified": c.verified,
                "accepted": c.accepted,
                "reason": c.reason,
            }
            for c in fp.checks
        ],
    }
    row["winner_positive"] = positive.get(fp.candidate, False) if fp.candidate else None
    if fp.status == "localized":
        pred = local(np.array(fp.corners_lonlat), lat0, lon0)
        iou = tpoly.intersection(pred).area / tpoly.union(pred).area
        row.update(
            iou=iou,
            centre_inside=bool(pred.contains(tpoly.centroid)),
            centre_err_km=tpoly.centroid.distance(pred.centroid) / 1000,
            # diagnostic: the truth turned 90 degrees about its centre (see README: some truths are)
            iou_truth_rot90=tpoly_rot90_iou(tpoly, pred),
        )
        row["success"] = iou >= 0.5 and row["centre_inside"]
    else:
        row["success"] = False
    return row


def tpoly_rot90_iou(tpoly: shapely.Polygon, pred: shapely.Polygon) -> float:
    rot = shapely.affinity.rotate(tpoly, 90, origin=tpoly.centroid)
    return rot.intersection(pred).area / rot.union(pred).area


def baseline(folder: Path) -> tuple[bool | None, int, int]:
    """Plain SIFT (ratio 0.85, mutual) + MAGSAC (4 px) between the 512 px photo and each 512 px candidate
    image: (is the candidate with most inliers a positive?, max inliers on positives, on negatives)."""
    from engine.footprint.matching import detect, fit_homography, match

    meta = json.loads((folder / "meta.json").read_text())
    positive = {c["file"]: c["iou_with_query"] > 0 for c in meta["candidates"]}
    photo = detect(read_image(next(folder.glob("query*.jpg"))))
    scores = {}
    for name in positive:
        cand = detect(read_image(folder / name))
        ia, ib = match(photo, cand)
        _, inl = fit_homography(photo.xy[ia], cand.xy[ib], 4.0)
        scores[name] = int(inl.sum())
    pick = max(scores, key=scores.get)
    pos = [v for k, v in scores.items() if positive[k]]
    neg = [v for k, v in scores.items() if not positive[k]]
    return (positive[pick] if pos else None), max(pos, default=0), max(neg, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", help="comma-separated photo ids (default: all)")
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--json", help="write per-photo rows as JSON here")
    args = ap.parse_args()
    if not ISS.is_dir():
        sys.exit(f"{ISS} not found: this benchmark needs ../shared/data/iss")
    folders = sorted(p for p in ISS.iterdir() if p.is_dir())
    if args.photos:
        folders = [f for f in folders if f.name in args.photos.split(",")]
    params = CoregParams()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    rows = []
    say(
        f"{'photo':18s} {'pos':>3s} {'status':9s} {'IoU':>5s} {'in':>3s} {'err km':>7s} {'ver':>4s} {'s':>5s}  "
        "baseline(pick pos, max inl pos/neg)  reason"
    )
    for folder in folders:
        row = run_photo(folder, params)
        row["baseline"] = baseline(folder)
        rows.append(row)
        iou = f"{row['iou']:.3f}" if "iou" in row else "  -  "
        err = f"{row['centre_err_km']:.2f}" if "iou" in row else "   -"
        cin = ("yes" if row.get("centre_inside") else "no") if "iou" in row else " - "
        say(
            f"{row['photo']:18s} {'yes' if row['has_positive'] else 'no':>3s} {row['status']:9s} {iou:>5s} {cin:>3s} "
            f"{err:>7s} {row['verified']:>4d} {row['seconds']:5.1f}  {row['baseline']!s:35s} {row['reason'] or ''}"
        )

    with_pos = [r for r in rows if r["has_positive"]]
    no_pos = [r for r in rows if not r["has_positive"]]
    accepted = [r for r in rows if r["status"] == "localized"]
    false_loc = [r for r in accepted if not r["success"]]
    say("")
    say(
        f"successes (IoU >= 0.5 and true centre inside): {sum(r['success'] for r in with_pos)} / {len(with_pos)} "
        "photos with a positive candidate"
    )
    say(
        f"localized: {len(accepted)} / {len(rows)}; false localizations: {len(false_loc)} "
        f"({', '.join(r['photo'] for r in false_loc) or 'none'}); on photos without a positive: "
        f"{sum(r['status'] == 'localized' for r in no_pos)} / {len(no_pos)}"
    )
    if accepted:
        say(
            f"median IoU of accepted: {statistics.median(r['iou'] for r in accepted):.3f}; median centre error: "
            f"{statistics.median(r['centre_err_km'] for r in accepted):.2f} km; "
            f"median IoU against the truth turned 90 deg: {statistics.median(r['iou_truth_rot90'] for r in accepted):.3f}"
        )
        say(
            "per accepted photo, IoU vs truth / vs truth turned 90 deg: "
            + ", ".join(f"{r['photo']} {r['iou']:.2f}/{r['iou_truth_rot90']:.2f}" for r in accepted)
        )
    say(
        f"seconds per photo: median {statistics.median(r['seconds'] for r in rows):.1f}, "
        f"mean {statistics.mean(r['seconds'] for r in rows):.1f} (10 candidates max, this machine)"
    )
    b = [r["baseline"] for r in with_pos]
    say(
        f"baseline plain SIFT+MAGSAC on the 512 px images: picks a positive for {sum(x[0] is True for x in b)} / "
        f"{len(b)}; max inliers on positives median {statistics.median(x[1] for x in b):.0f}, on negatives median "
        f"{statistics.median(r['baseline'][2] for r in rows):.0f} (max {max(r['baseline'][2] for r in rows)})"
    )
    ver_pos = sorted(c["verified"] for r in rows for c in r["checks"] if c["positive"] and c["verified"])
    ver_neg = sorted(c["verified"] for r in rows for c in r["checks"] if not c["positive"])
    say(
        f"calibration: verified matches on negative candidates: max {max(ver_neg, default=0)} over {len(ver_neg)} "
        f"tried (distribution {np.bincount(ver_neg).tolist() if ver_neg else []}); on positives (nonzero): "
        f"min {min(ver_pos, default=0)}, median {statistics.median(ver_pos) if ver_pos else 0}; "
        f"threshold min_verified = {params.min_verified}"
    )
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
