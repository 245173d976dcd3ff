"""Fine-tune the default encoder on the analyst's own placed photos (``skyloc train``, issue 17 part 2).

What AstroLoc's gain came from, at the size of one analyst's work and a 2-core CPU:

* **pairs**: every *localized* feature of a footprint layer (the photo and its polygon) is paired with the
  index tiles that overlap the polygon, each weighted by its IoU with it (AstroLoc weights its positives by
  IoU). The pairwise loss is a soft-target InfoNCE: the photo's similarities to the tiles of the batch,
  softmaxed, are pulled towards the IoU weights (tiles that do not overlap the footprint get none);
* **unsupervised mining** on the index's own tiles: clusters of tiles that overlap each other (sampled
  around the footprints, where this analyst photographs, and elsewhere), trained with a multi-similarity
  loss (Wang et al. 2019), positives = footprints that overlap, negatives = footprints that do not.

Two kinds of base can be fine-tuned, whichever the index was built with: an EfficientNet-Lite + GeM model
with its shipped weights (the default, Lite1, or Lite0, the default before it; its last blocks and head
are trained, the early stages stay frozen and BatchNorm keeps
its ImageNet statistics: batches are tiny) or AstroLoc with the user's checkpoint (DINOv2 ViT-B/14 + SALAD
+ projection; its last ViT blocks, final norm and the whole aggregator are trained). Photos are augmented
(random crop, quarter turns, brightness) since pairs are few. The photometric front end and input size of
the index are kept.

The result is a **model folder**: ``weights.pth`` (the full trunk state dict), ``weights.pth.sha256``,
``skyloc-model.json`` (the card the engine reads: base model, front end, input size, sha256, training
record) and ``MODEL.md`` (the same for people). ``--model MODEL_DIR`` accepts it everywhere
(:func:`engine.nets.registry.load_encoder`); its model id (``effnet-lite1-gem-ft+gray-clahe/sha256:...``)
differs from the untrained default's, so an index built with one refuses queries with the other.

Resume: training runs in ``.<out name>.train-partial/`` beside the output with a checkpoint every
``checkpoint_every`` steps; a run that was killed (or interrupted with Ctrl-C) continues from there with
``resume=True`` when its settings are the same. A cancel (CancelToken) removes that folder: nothing is left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch
import torch.nn.functional as F

from . import __version__
from .atomic import atomic_path, replace_dir
from .errors import CancelledError, EmptyInputError, InputError, OutputExistsError, WeightsError
from .imagery.photos import read_image
from .nets import astroloc, effnet_gem
from .nets.checkpoints import check_sha256, load_checkpoint, sha256_file
from .nets.frontend import check_frontend, tag_model_id, untag_model_id
from .nets.onnx_backend import IMAGENET_MEAN, IMAGENET_STD, Preprocess, TorchEncoder
from .progress import CancelToken, ProgressFn, no_progress

CARD_FILE = "skyloc-model.json"
WEIGHTS_FILE = "weights.pth"
CARD_FORMAT = 1
FT_NAME = effnet_gem.NAME + "-ft"
#: The networks ``skyloc train`` fine-tunes (the base an index was built with), and their model-id prefix.
BASES = {
    effnet_gem.LITE1_NAME: effnet_gem.LITE1_NAME + "-ft",
    effnet_gem.NAME: FT_NAME,
    astroloc.NAME: astroloc.NAME + "-ft",
}
MODEL_FILES = frozenset({CARD_FILE, WEIGHTS_FILE, WEIGHTS_FILE + ".sha256", "MODEL.md"})
#: Blocks trained by default: the last two of EfficientNet-Lite1/Lite0 (21/16 in all) plus its conv head, or of
#: AstroLoc's ViT-B (12 in all) plus its final norm and the aggregator.
DEFAULT_TRAIN_BLOCKS = 2
FOOTPRINT_LAYERS = ("footprints",)


@dataclass
class TrainParams:
    steps: int = 30
    batch_photos: int = 4
    mined_tiles: int = 8  # tiles of the unsupervised clusters per step (pairs of overlapping tiles)
    lr: float = 1e-4
    train_blocks: int = DEFAULT_TRAIN_BLOCKS
    temperature: float = 0.05
    ms_weight: float = 1.0
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.8  # GeM cosines of the untrained network are high: a base of 0.5 pushes all apart
    seed: int = 0
    checkpoint_every: int = 10


@dataclass
class TrainResult:
    out: str
    model_id: str
    weights_sha256: str
    steps: int
    photos: int
    pairs: int
    skipped: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- model folder


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CARD_FILE).is_file()


def read_card(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable Skyloc model card: {exc}") from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or card.get("base") not in BASES:
        raise WeightsError(
            f"{path} is not a Skyloc model card (format {CARD_FORMAT}, base one of {', '.join(BASES)})"
        )
    return card


def ft_model_id(size: int, digest: str, frontend: str, base: str = effnet_gem.NAME) -> str:
    default = effnet_gem.DEFAULT_INPUT_SIZE if base in effnet_gem.WHEELS else astroloc.DEFAULT_INPUT_SIZE
    arch = BASES[base] + ("" if size == default else f"@{size}")
    return tag_model_id(f"{arch}/sha256:{digest[:8]}", frontend)


def load_model_folder(
    folder: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    frontend: str | None = None,
    weights: str | None = None,
    sha256: str | None = None,
) -> TorchEncoder:
    """The torch encoder of a model folder written by :func:`train`; its weights are checked against the card."""
    folder = Path(folder).resolve()
    if weights:
        raise InputError(f"model folder {folder} carries its own weights: give no --weights")
    card = read_card(folder)
    fe = check_frontend(card["frontend"])
    if frontend is not None and check_frontend(frontend) != fe:
        raise InputError(f"model folder {folder} was trained with front end {fe!r}, not {frontend!r}")
    path = folder / card.get("weights", WEIGHTS_FILE)
    if not path.is_file():
        raise WeightsError(f"model folder {folder}: weights file {path.name} is missing")
    digest = check_sha256(path, sha256 or card["weights_sha256"])
    size = int(input_size or card["input_size"])
    if not 32 <= size <= 2048:
        raise InputError(f"input_size must be between 32 and 2048 px, got {size}")
    base = card["base"]
    if base == astroloc.NAME:
        net, _ = astroloc.astroloc_from_state_dict(load_checkpoint(path))
        astroloc.check_input_size(size, net.aggregator.agg.config.num_clusters)
    else:
        net = effnet_gem.EffnetGem(card.get("variant", "gem"), size, arch=effnet_gem.WHEELS[base].arch)
        effnet_gem.load_effnet_weights(net, path)
    return TorchEncoder(
        net.eval(),
        name=str(folder),
        model_id=ft_model_id(size, digest, fe, base),
        dim=net.dim,
        preprocess=_preprocess(base, size, fe),
    )


def _preprocess(base: str, size: int, frontend: str) -> Preprocess:
    if base == astroloc.NAME:
        return Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, frontend=frontend)
    return Preprocess(size, effnet_gem.TF_LITE_MEAN, effnet_gem.TF_LITE_STD, frontend=frontend)


# --------------------------------------------------------------------------------------------- inputs


def read_pairs(footprints: str | os.PathLike[str]) -> tuple[list[tuple[Path, shapely.Geometry]], list[str]]:
    """(photo path, footprint polygon in EPSG:4326) of every localized feature; and why others were skipped."""
    import pyogrio

    from .vector_io import read_layer

    path = Path(footprints)
    if not path.is_file():
        raise InputError(f"footprint layer {path}: no such file")
    try:
        layers = [str(n) for n, _ in pyogrio.list_layers(path)]
    except Exception as exc:  # pyogrio raises its own DataSourceError
        raise InputError(f"{path} is not a readable vector file: {exc}") from exc
    layer = next((n for n in FOOTPRINT_LAYERS if n in layers), layers[0] if layers else None)
    if layer is None:
        raise EmptyInputError(f"{path} holds no layer")
    geoms, cols = read_layer(path, layer=layer)
    if not geoms:
        raise EmptyInputError(f"footprint layer {path} ({layer}) has no feature")
    if "photo" not in cols:
        raise InputError(f"{path} ({layer}) has no 'photo' field: is it a Skyloc footprint layer?")
    status = cols.get("status", np.array(["localized"] * len(geoms), dtype=object))
    to_wgs84 = _to_wgs84(cols.get("__crs__"))
    pairs, skipped = [], []
    for geom, photo, st in zip(geoms, cols["photo"], status, strict=True):
        if st != "localized" or geom is None or geom.is_empty or not photo:
            continue
        p = Path(str(photo))
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            skipped.append(f"{p}: photo not found")
            continue
        pairs.append((p, to_wgs84(geom)))
    if not pairs:
        why = f" ({len(skipped)} photos not found)" if skipped else ""
        raise EmptyInputError(f"footprint layer {path} has no localized feature to train on{why}")
    return pairs, skipped


def _to_wgs84(crs: str | None):
    if not crs or crs.upper() in ("EPSG:4326", "OGC:CRS84"):
        return lambda g: g
    from pyproj import Transformer

    tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return lambda g: shapely.ops.transform(tr.transform, g)


def _open_tiles(idx) -> Any:
    """The index's own sources opened again with its build settings, and their tile specs in tile_id order
    as ``[(source, spec), ...]`` (``source.read(spec, size)`` gives a tile's uint8 RGB)."""
    from .imagery import open_source

    build = idx.manifest["build"]
    sources = []
    for s in build.get("sources") or []:
        sources.append(
            open_source(
                s,
                tile_sizes=tuple(build.get("tile_sizes") or (256, 512)),
                overlap=build.get("overlap", 0.5),
                bands=build.get("bands"),
                span=build.get("span", 4),
                exclude=build.get("exclude"),
            )
        )
    specs = [(src, spec) for src in sources for spec in src.specs()]
    if len(specs) != len(idx.tiles):
        for src in sources:
            src.close()
        raise InputError(
            f"the imagery of index {idx.path} changed since it was built ({len(specs)} tiles now, "
            f"{len(idx.tiles)} indexed): rebuild the index before training on it"
        )
    return specs, sources


# ------------------------------------------------------------------------------------------------- nets


class _Trainable:
    """EfficientNet-Lite + GeM with its first blocks frozen (run without gradient)."""

    def __init__(self, net: effnet_gem.EffnetGem, train_blocks: int):
        self.net = net
        t = net.trunk
        n = len(t._blocks)
        if not 0 <= train_blocks <= n:
            raise InputError(f"train_blocks must be between 0 and {n}, got {train_blocks}")
        self.first = n - train_blocks
        for p in net.parameters():
            p.requires_grad_(False)
        self.modules = [*t._blocks[self.first :], t._conv_head, t._bn1]
        for m in self.modules:
            for p in m.parameters():
                p.requires_grad_(True)
        net.eval()  # BatchNorm keeps its statistics: batches of a few images would ruin them

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.parameters()}
        return {k: v.detach().clone() for k, v in self.net.named_parameters() if id(v) in names}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.net.trunk
        with torch.no_grad():
            x = t._swish(t._bn0(t._conv_stem(x)))
            for block in t._blocks[: self.first]:
                x = block(x)
        for block in t._blocks[self.first :]:
            x = block(x)
        x = t._swish(t._bn1(t._conv_head(x)))
        return F.normalize(effnet_gem.gem(x), dim=-1)


class _TrainableViT:
    """AstroLoc (ViT-B/14 + SALAD + projection) with its first ViT blocks frozen. Frozen blocks see no
    gradient and keep no activations for backward (their inputs need none), so memory stays small."""

    def __init__(self, net: astroloc.AstroLocNet, train_blocks: int):
        self.net = net
        blocks = net.backbone.blocks
        if not 0 <= train_blocks <= len(blocks):
            raise InputError(f"train_blocks must be between 0 and {len(blocks)}, got {train_blocks}")
        for p in net.parameters():
            p.requires_grad_(False)
        for m in [*blocks[len(blocks) - train_blocks :], net.backbone.norm, net.aggregator]:
            for p in m.parameters():
                p.requires_grad_(True)
        net.eval()  # no dropout; LayerNorm has no batch statistics

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _base_of(idx) -> tuple[str, Path | None]:
    """Which network ``skyloc train`` fine-tunes for this index: an EfficientNet-Lite model (the default,
    Lite1, or Lite0) with its shipped weights, or AstroLoc with the checkpoint the index was built from (its
    sha256 must still match the model id)."""
    model = idx.manifest["model"]
    arch, _, weights_id = untag_model_id(model["model_id"]).partition("/")
    arch = arch.partition("@")[0]
    if arch in effnet_gem.WHEELS and weights_id == f"sha256:{effnet_gem.WHEELS[arch].sha256[:8]}":
        return arch, None
    if arch == astroloc.NAME:
        weights = idx.manifest["build"].get("weights")
        if not weights or not Path(weights).is_file():
            raise InputError(
                f"index {idx.path} was built with AstroLoc weights {weights or '(unknown)'}, not found now: "
                "put the checkpoint back where it was to fine-tune it"
            )
        if f"sha256:{sha256_file(weights)[:8]}" != weights_id:
            raise InputError(
                f"{weights} is not the checkpoint index {idx.path} was built with ({weights_id})"
            )
        return astroloc.NAME, Path(weights)
    raise InputError(
        f"index {idx.path} was built with {model['model_id']}: `skyloc train` fine-tunes the default "
        f"model ({effnet_gem.LITE1_NAME}) or {effnet_gem.NAME} (GeM, shipped weights) or AstroLoc with its "
        "checkpoint; build the index with one of those"
    )


def multi_similarity_loss(
    emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, alpha: float, beta: float, base: float
) -> torch.Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, given boolean pos/neg masks."""
    sim = emb @ emb.T
    losses = []
    eps = 0.1
    for i in range(len(emb)):
        sp, sn = sim[i][pos[i]], sim[i][neg[i]]
        if len(sp) == 0 or len(sn) == 0:
            continue
        sp_m = sp[sp - eps < sn.max()]  # hard positives: less similar than the hardest negative + margin
        sn_m = sn[sn + eps > sp.min()]  # hard negatives
        if len(sp_m) == 0 or len(sn_m) == 0:
            continue
        lp = torch.log1p(torch.exp(-alpha * (sp_m - base)).sum()) / alpha
        ln = torch.log1p(torch.exp(beta * (sn_m - base)).sum()) / beta
        losses.append(lp + ln)
    return torch.stack(losses).mean() if losses else sim.new_zeros(())


def iou_matrix(a: list[shapely.Geometry], b: list[shapely.Geometry]) -> np.ndarray:
    """IoU of every geometry of ``a`` with every one of ``b`` (0 where they do not intersect). The pairs
    that intersect come from an STRtree and their areas from shapely's vectorised functions: a photo
    against a large index is not a Python loop over every tile."""
    out = np.zeros((len(a), len(b)), np.float32)
    if not len(a) or not len(b):
        return out
    ia, ib = shapely.STRtree(b).query(a, predicate="intersects")
    ga, gb = np.asarray(a, dtype=object)[ia], np.asarray(b, dtype=object)[ib]
    inter = shapely.area(shapely.intersection(ga, gb))
    union = shapely.area(shapely.union(ga, gb))
    out[ia, ib] = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    f = rng.uniform(0.75, 1.0)
    ch, cw = max(8, int(h * f)), max(8, int(w * f))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = np.rot90(img[y : y + ch, x : x + cw], int(rng.integers(4)))
    gain = rng.uniform(0.8, 1.2)
    return np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- training


def _fingerprint(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_out(out: Path, overwrite: bool) -> Path:
    out = Path(os.path.abspath(out))
    if out.exists():
        ours = out.is_dir() and not out.is_symlink() and is_model_folder(out)
        ours = ours and {p.name for p in out.iterdir()} <= MODEL_FILES
        if not ours:
            raise OutputExistsError(f"{out} exists and is not a Skyloc model folder: choose another --out")
        if not overwrite:
            raise OutputExistsError(f"model folder {out} exists: give --overwrite to replace it")
    return out


def train(
    footprints: str | os.PathLike[str],
    index_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    params: TrainParams | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_photo_side: int = 1024,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> TrainResult:
    """Fine-tune the index's encoder (the default model, or AstroLoc with its checkpoint) on the localized
    features of ``footprints``."""
    from .retrieval.index_store import open_index

    t0 = time.perf_counter()
    params = params or TrainParams()
    if params.steps < 1 or params.batch_photos < 1 or params.mined_tiles < 0:
        raise InputError("steps and batch_photos must be >= 1, mined_tiles >= 0")
    out = _check_out(Path(out), overwrite)
    idx = open_index(index_dir)
    model = idx.manifest["model"]
    base, base_weights = _base_of(idx)
    frontend, size = check_frontend(model.get("frontend", "none")), int(model["input_size"])
    pairs, skipped = read_pairs(footprints)
    feet = list(idx.tiles.footprints)
    photo_iou = iou_matrix([g for _, g in pairs], feet)
    keep = photo_iou.sum(1) > 0
    skipped += [
        f"{p}: its footprint overlaps no tile of the index"
        for (p, _), k in zip(pairs, keep, strict=True)
        if not k
    ]
    pairs, photo_iou = [pr for pr, k in zip(pairs, keep, strict=True) if k], photo_iou[keep]
    if not pairs:
        raise EmptyInputError(f"no localized footprint of {footprints} overlaps a tile of index {idx.path}")
    n_pairs = int((photo_iou > 0).sum())  # photo-tile pairs the pairwise loss can use

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {
        "params": asdict(params),
        "footprints": [(str(p), g.wkt) for p, g in pairs],
        "index_model": model["model_id"],
        "tiles": len(feet),
    }
    staged = out.with_name(f".{out.name}.train-partial")
    marker, ckpt_path = staged / "train_params.json", staged / "checkpoint.pt"
    fingerprint = _fingerprint(settings)
    start = 0
    if staged.exists():
        if staged.is_symlink() or not marker.is_file():  # not ours: never removed (as index folders)
            raise OutputExistsError(
                f"{staged} exists and was not made by skyloc train (no {marker.name}): move it away"
            )
        recorded = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = json.loads(marker.read_text()).get("fingerprint")
        if not (resume and recorded == fingerprint and ckpt_path.is_file()):
            shutil.rmtree(staged)
    staged.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        with atomic_path(marker, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))

    try:
        if base == astroloc.NAME:
            net, _ = astroloc.astroloc_from_state_dict(load_checkpoint(base_weights))
            net.to(device)
            model_t: Any = _TrainableViT(net, params.train_blocks)
        else:
            net = effnet_gem.EffnetGem("gem", size, arch=effnet_gem.WHEELS[base].arch)
            effnet_gem.load_effnet_weights(net, effnet_gem.wheel_weights_path(base))
            net.to(device)
            model_t = _Trainable(net, params.train_blocks)
        opt = torch.optim.AdamW(model_t.parameters(), lr=params.lr, weight_decay=1e-4)
        losses: list[float] = []
        if ckpt_path.is_file():
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            start, losses = int(ck["step"]), [float(v) for v in ck["losses"]]
            progress(start / params.steps, f"resumed at step {start} of {params.steps}")
        resumed_from = start
        prep = _preprocess(base, size, frontend)
        specs, sources = _open_tiles(idx)
        try:
            photos = [_small(read_image(p), max_photo_side) for p, _ in pairs]
            near = np.flatnonzero(
                shapely.intersects(
                    shapely.unary_union([g.buffer(g.length * 0.25) for _, g in pairs]),
                    np.array(feet, dtype=object),
                )
            )
            tree = shapely.STRtree(feet)
            for step in range(start, params.steps):
                if cancel is not None:
                    cancel.check()
                rng = np.random.default_rng([params.seed, step])
                data = _Batch(photos, pairs, photo_iou, feet, tree, near, specs, size)
                loss, parts = _step(model_t, opt, prep, data, params, rng, device)
                losses.append(loss)
                progress(
                    (step + 1) / params.steps * 0.95,
                    f"step {step + 1} of {params.steps}: loss {loss:.4f} (pairs {parts[0]:.4f}, ms {parts[1]:.4f})",
                )
                if (step + 1) % params.checkpoint_every == 0 and step + 1 < params.steps:
                    with atomic_path(ckpt_path, suffix=".pt") as tmp:
                        torch.save(
                            {
                                "net": net.state_dict(),
                                "opt": opt.state_dict(),
                                "step": step + 1,
                                "losses": losses,
                            },
                            tmp,
                        )
        finally:
            for src in sources:
                src.close()
        if cancel is not None:
            cancel.check()
        folder = staged / "model"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        trunk = (
            net.trunk if base in effnet_gem.WHEELS else net
        )  # AstroLoc: MegaLoc's layout, loads as published
        state = {f"{k}": v.detach().cpu() for k, v in trunk.state_dict().items()}
        torch.save(state, folder / WEIGHTS_FILE)
        digest = sha256_file(folder / WEIGHTS_FILE)
        (folder / (WEIGHTS_FILE + ".sha256")).write_text(f"{digest}  {WEIGHTS_FILE}\n")
        model_id = ft_model_id(size, digest, frontend, base)
        card = {
            "format": CARD_FORMAT,
            "base": base,
            **({"variant": "gem"} if base in effnet_gem.WHEELS else {"base_weights": str(base_weights)}),
            "frontend": frontend,
            "input_size": size,
            "dim": net.dim,
            "weights": WEIGHTS_FILE,
            "weights_sha256": digest,
            "model_id": model_id,
            "base_model_id": model["model_id"],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "skyloc_version": __version__,
            "training": {
                "footprints": str(Path(footprints).resolve()),
                "index": str(idx.path),
                "photos": len(pairs),
                "pairs": n_pairs,
                "losses": "IoU-weighted soft InfoNCE photo<->tiles + multi-similarity on overlapping tiles",
                "params": asdict(params),
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "device": str(device),
            },
        }
        (folder / CARD_FILE).write_text(json.dumps(card, indent=1))
        (folder / "MODEL.md").write_text(_model_md(card))
        if cancel is not None:
            cancel.check()
        replace_dir(folder, out)
        shutil.rmtree(staged, ignore_errors=True)
    except BaseException as exc:
        # a cancel leaves nothing; a failure or a kill keeps the folder only when a checkpoint makes it
        # resumable (--resume), else nothing half-made stays behind
        if isinstance(exc, CancelledError) or not ckpt_path.is_file():
            shutil.rmtree(staged, ignore_errors=True)
        raise
    progress(1.0, f"model written to {out}")
    return TrainResult(
        out=str(out),
        model_id=model_id,
        weights_sha256=digest,
        steps=params.steps,
        photos=len(pairs),
        pairs=n_pairs,
        skipped=skipped,
        losses=losses,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t0,
        device=str(device),
    )


def _small(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    s = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR))


@dataclass
class _Batch:
    """What a step samples from: decoded photos, their pairs and IoUs, the index's tiles."""

    photos: list[np.ndarray]
    pairs: list[tuple[Path, shapely.Geometry]]
    photo_iou: np.ndarray  # (photos, tiles)
    feet: list[shapely.Geometry]
    tree: shapely.STRtree
    near: np.ndarray  # tiles around the footprints: where this analyst photographs
    specs: list
    size: int


def _step(model_t, opt, prep, d: _Batch, params: TrainParams, rng: np.random.Generator, device):
    """One optimisation step: a batch of photos with a positive tile each, plus mined tile pairs."""
    photos, pairs, photo_iou, feet, tree, near, specs, size = (
        d.photos,
        d.pairs,
        d.photo_iou,
        d.feet,
        d.tree,
        d.near,
        d.specs,
        d.size,
    )
    n_ph = min(params.batch_photos, len(pairs))
    chosen = rng.choice(len(pairs), n_ph, replace=False)
    tile_ids: list[int] = []
    for i in chosen:
        w = photo_iou[i]
        tile_ids.append(int(rng.choice(len(w), p=w / w.sum())))
    for _ in range(params.mined_tiles // 2):  # a tile and one that overlaps it: an unsupervised positive
        pool = near if len(near) and rng.random() < 0.5 else np.arange(len(feet))
        a = int(rng.choice(pool))
        neigh = [int(j) for j in tree.query(feet[a], predicate="intersects") if j != a]
        neigh = [j for j in neigh if feet[a].intersection(feet[j]).area > 0]
        tile_ids += [a] + ([int(rng.choice(neigh))] if neigh else [])
    imgs = [_augment(photos[i], rng) for i in chosen]
    imgs += [np.rot90(specs[t][0].read(specs[t][1], size), int(rng.integers(4))) for t in tile_ids]
    x = np.concatenate([prep(np.ascontiguousarray(im)[None]) for im in imgs])
    emb = model_t(torch.from_numpy(x).to(device))
    ph, tl = emb[:n_ph], emb[n_ph:]

    w = torch.from_numpy(photo_iou[chosen][:, tile_ids]).to(device)
    target = w / w.sum(1, keepdim=True)
    logits = ph @ tl.T / params.temperature
    pair_loss = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()

    geoms = [pairs[i][1] for i in chosen] + [feet[t] for t in tile_ids]
    iou = torch.from_numpy(iou_matrix(geoms, geoms)).to(device)
    eye = torch.eye(len(geoms), dtype=torch.bool, device=device)
    pos, neg = (iou > 0) & ~eye, (iou == 0) & ~eye
    ms = multi_similarity_loss(emb, pos, neg, params.ms_alpha, params.ms_beta, params.ms_base)
    loss = pair_loss + params.ms_weight * ms
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach()), (float(pair_loss.detach()), float(ms.detach()))


_BASE_WORDS = {
    effnet_gem.LITE1_NAME: "EfficientNet-Lite1 ImageNet + GeM",
    effnet_gem.NAME: "EfficientNet-Lite0 ImageNet + GeM",
    astroloc.NAME: "AstroLoc: DINOv2 ViT-B/14 + SALAD + projection, from the user's checkpoint",
}
_TRAINED_TOO = {
    effnet_gem.LITE1_NAME: "conv head",
    effnet_gem.NAME: "conv head",
    astroloc.NAME: "final norm + aggregator",
}


def _model_md(card: dict[str, Any]) -> str:
    t = card["training"]
    return (
        f"# Fine-tuned Skyloc model `{card['model_id']}`\n\n"
        f"- base: {card['base']} ({_BASE_WORDS[card['base']]}), base model id `{card['base_model_id']}`\n"
        f"- front end: `{card['frontend']}`, input size {card['input_size']} px, {card['dim']}-d descriptor\n"
        f"- weights: `{card['weights']}`, sha256 `{card['weights_sha256']}`\n"
        f"- trained {card['created']} by skyloc {card['skyloc_version']} on {t['device']}: {t['params']['steps']} "
        f"steps, {t['photos']} photos ({t['pairs']} photo-tile pairs) from `{t['footprints']}`, "
        f"tiles of `{t['index']}`\n"
        f"- losses: {t['losses']}; first {t['loss_first']}, last {t['loss_last']}\n"
        f"- last {t['params']['train_blocks']} blocks + {_TRAINED_TOO[card['base']]} trained, the rest frozen\n\n"
        "Use it with `--model <this folder>` (index, localize, footprint). Indexes built with another model "
        "refuse it: rebuild the index with it. Whether it beats the untrained default on *your* photos is "
        "not known until measured (see bench/train_iss.py for how it was measured on ISS photos).\n"
    )
