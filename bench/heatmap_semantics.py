"""Does a click's heatmap light up places of the same kind? Water/land on the NAIP samples, per feature stage.

    python bench/heatmap_semantics.py [--clicks 8] [--out bench/results/heatmap_semantics.txt]

Labels: water where NDWI = (green - NIR) / (green + NIR) > 0 (NAIP band 4 is near infrared). For random
clicks on water and on land, the heatmap (cosine similarity of bilinearly interpolated cell features, i.e.
the default model's identity-bilinear NILI) scores every pixel farther than 300 m from the click; the ROC
AUC says how well it separates the clicked class from the other (0.5: no better than chance). Stages of
the default backbone, EfficientNet-Lite0 (ImageNet): the stride-8 stage, the stride-16 stages (block 7,
block 10: the default), and the 1280-channel conv head (stride 32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.embed.backbones import EffnetBackbone  # noqa: E402
from engine.embed.raster import EmbedRaster  # noqa: E402

STAGES = {
    "block 4 (s8, 40-d)": 4,
    "block 7 (s16, 80-d)": 7,
    "block 10 (s16, 112-d) = default": 10,
    "conv head (s32, 1280-d)": -1,
}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    pos = labels.sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * (len(labels) - pos)))


def stage_maps(path: Path) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    bb = EffnetBackbone("torch")
    t = bb.net.trunk
    with EmbedRaster(path) as r:
        h, w = r.height, r.width
        rgb, _ = r.read_rgb(0, 0, -(-w // 32) * 32, -(-h // 32) * 32)
    outs: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        x = t._swish(t._bn0(t._conv_stem(bb._tensor(rgb))))
        for i, block in enumerate(t._blocks):
            x = block(x)
            outs[i] = x
        outs[-1] = t._swish(t._bn1(t._conv_head(x)))
    size = rgb.shape[:2]
    maps = {}
    for name, idx in STAGES.items():
        up = F.interpolate(outs[idx], size=size, mode="bilinear", align_corners=False)[0, :, :h, :w]
        maps[name] = F.normalize(up, dim=0)
    with rasterio.open(path) as ds:
        a = ds.read().astype(np.float64)
    water = (a[1] - a[3]) / (a[1] + a[3] + 1e-6) > 0
    return maps, water


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=8, help="clicks per class and raster")
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [
        f"# Heatmap semantics: ROC AUC of the click's heatmap for its own class (water/land by NDWI), "
        f"{args.clicks} clicks per class and date, pixels > 300 m from the click",
        "",
        "| stage | raster | water clicks | land clicks |",
        "| --- | --- | --- | --- |",
    ]
    for raster in ("naip_2009.tif", "naip_2018.tif"):
        maps, water = stage_maps(ROOT / "sample" / raster)
        rng = np.random.default_rng(0)
        rows, cols = np.mgrid[0 : water.shape[0], 0 : water.shape[1]]
        clicks = []
        for kind, mask in (("water", water), ("land", ~water)):
            rr, cc = np.nonzero(mask)
            clicks += [(kind, rr[k], cc[k]) for k in rng.choice(len(rr), args.clicks, replace=False)]
        for name, g in maps.items():
            g = g.numpy()
            res: dict[str, list[float]] = {"water": [], "land": []}
            for kind, r, c in clicks:
                heat = np.einsum("chw,c->hw", g, g[:, r, c])
                far = (rows - r) ** 2 + (cols - c) ** 2 > 60**2  # 60 px = 300 m at 5 m
                labels = water if kind == "water" else ~water
                res[kind].append(auc(heat[far], labels[far]))
            lines.append(f"| {name} | {raster} | {np.mean(res['water']):.3f} | {np.mean(res['land']):.3f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
