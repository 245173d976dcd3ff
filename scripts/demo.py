"""The README's first command: index the bundled 2018 NAIP raster, localize the bundled 2009 photo, then
estimate its footprint (on the 2018 imagery placed on some runs, rejected on others; placed on the 2009 one).

Runs the real `skyloc` command line (in-process) with the embedded default model, then checks the answer
against the sample's ground truth and prints where the results are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.cli import main as skyloc  # noqa: E402
from engine.train import iou_matrix  # noqa: E402
from engine.vector_io import read_layer  # noqa: E402

SAMPLE = ROOT / "sample"


def run(args: list[str], expect: int | tuple[int, ...] = 0) -> int:
    print("$ skyloc " + " ".join(shlex.quote(a) for a in args), flush=True)
    code = skyloc(args)
    allowed = expect if isinstance(expect, tuple) else (expect,)
    if code not in allowed:
        sys.exit(f"demo: `skyloc {args[0]}` exited with {code}, expected {' or '.join(map(str, allowed))}")
    return code


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="demo_out")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    index_dir, cands = out / "naip2018_index", out / "candidates.gpkg"
    photo = SAMPLE / "photo_2009_oblique.jpg"

    run(["index", str(SAMPLE / "naip_2018.tif"), "--out", str(index_dir), "--tile-sizes", "256,512"])
    run(["localize", str(photo), "--index", str(index_dir), "--top-k", "5", "--out", str(cands)])

    truth = json.loads((SAMPLE / "photo_2009_oblique.json").read_text())
    true_poly = shapely.Polygon(truth["ground_corners_lonlat"])
    geoms, cols = read_layer(cands)
    print(f"\ncandidate footprints ({cols['__crs__']}), checked against the sample's true footprint:")
    first = None
    ious = iou_matrix(list(geoms), [true_poly])[:, 0]
    for iou, rank, score, rot in zip(ious, cols["rank"], cols["score"], cols["rotation"], strict=True):
        first = first or (rank if iou > 0.25 else None)
        print(f"  rank {rank}: score {score:.3f}, rotation {rot:3d} deg, IoU with truth {iou:.2f}")
    if first:
        print(
            f"  -> the true place (IoU > 0.25) is at rank {first}. The photo is from 2009 and the index from 2018:"
        )
        print("     the lakes flooded in between, so this is a hard case for the untrained default model.")
    else:
        print(
            "  -> the true place is not in the top 5 (2009 photo vs 2018 index: the lakes flooded in between)."
        )

    print(
        "\nFootprint on the 2018 imagery (9 years of change: SIFT finds no consistent match; the learned matcher"
        " it falls back to places it on some runs and not on others, exit code 0 or 6):"
    )
    fp2018, fp2009 = out / "footprint_2018.gpkg", out / "footprint_2009.gpkg"
    code = run(
        [
            "localize",
            str(photo),
            "--index",
            str(index_dir),
            "--top-k",
            "5",
            "--footprint",
            "--out",
            str(fp2018),
            "--restart",
        ],
        expect=(0, 6),
    )
    if code == 0:
        geoms, cols = read_layer(fp2018)
        iou = iou_matrix(list(geoms[:1]), [true_poly])[0, 0]
        print(f"  placed: {cols['verified'][0]} verified matches, IoU with the true ground square {iou:.2f}")
    else:
        print("  not placed (exit 6): the photo is rejected, with the reason above")
    print("\nFootprint on the 2009 imagery the photo was taken from:")
    run(
        [
            "footprint",
            str(photo),
            "--against",
            str(SAMPLE / "naip_2009.tif"),
            "--out",
            str(fp2009),
            "--restart",
        ]
    )
    geoms, cols = read_layer(fp2009)
    iou = iou_matrix(list(geoms[:1]), [true_poly])[0, 0]
    print(f"  footprint status {cols['status'][0]}, {cols['verified'][0]} verified matches")
    print(f"  IoU with the ground square the photo shows: {iou:.2f} (the photo also shows ground beyond it)")
    print("\nEmbedding at a clicked point (lon, lat) and a similarity heatmap of the 2018 raster against it:")
    lon, lat = -99.1540, 47.0205  # a lake shore in the sample
    emb = out / "embedding.json"
    run(
        [
            "embed",
            str(SAMPLE / "naip_2018.tif"),
            "--at",
            f"{lon},{lat}",
            "--crs",
            "EPSG:4326",
            "--out",
            str(emb),
        ]
    )
    heat = out / "heatmap.tif"
    run(
        [
            "heatmap",
            str(SAMPLE / "naip_2018.tif"),
            "--at",
            f"{lon},{lat}",
            "--crs",
            "EPSG:4326",
            "--out",
            str(heat),
        ]
    )
    print("\nResults:")
    print(f"  index (FAISS + tile footprints + manifest): {index_dir.resolve()}")
    print(f"  candidate footprints (open in QGIS):        {cands.resolve()}")
    print(f"  footprints (status + reason per photo):     {fp2018.resolve()}, {fp2009.resolve()}")
    print(f"  georeferenced photo (COG) + QGIS GCPs:      {(out / 'footprint_2009_georef').resolve()}")
    print(f"  embedding at the point (JSON):              {emb.resolve()}")
    print(f"  similarity heatmap (COG + QGIS style .qml): {heat.resolve()}")


if __name__ == "__main__":
    main()
