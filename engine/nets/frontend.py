"""Photometric front ends: what an encoder does to an image's colours before its network sees it.

Astronaut photos are hazy, blue-shifted and low in contrast; Sentinel-2 cloudless mosaics are saturated and
green. A front end maps both to a common look before encoding (issue 17). It is part of the encoder's
identity, like its weights:

* it runs inside :class:`engine.nets.onnx_backend.Preprocess`, after the resize to the network's input size
  and before the network's own mean/std normalisation, in numpy (OpenCV for CLAHE), so database tiles and
  photos go through the very same code on the torch and the ONNX backends (the ONNX graph does not include
  it: it runs beside it);
* a model spec names it: ``effnet-lite1-gem+gray-clahe``; a bare model name means the model's default front
  end (``registry.DEFAULT_FRONTEND``);
* the model id carries it (``effnet-lite1-gem+gray-clahe/sha256:77cc7160``; ``none`` adds nothing, so ids of
  indexes built before front ends existed are unchanged) and the index manifest records it
  (``model.frontend``): an index refuses a query encoder with another front end, as it refuses another model.

A fine-tuned model folder (``skyloc train``, issue 17 part 2) records the front end it was trained with by
name (:func:`check_frontend` validates a recorded name) and reuses :func:`apply` unchanged.

Every front end takes (B, S, S, 3) uint8 RGB and returns (B, S, S, 3) float32 on the 0-1 scale, which the
encoder then normalises with its mean/std as before. ``none`` is exactly ``x / 255``.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InputError

#: Contrast-limited adaptive histogram equalisation: OpenCV's usual settings (clip 2, 8 x 8 tiles of the
#: S x S input, i.e. 48-px tiles at 384 px). Not tuned on the benchmark.
CLAHE_CLIP = 2.0
CLAHE_GRID = (8, 8)
#: Per-image standardisation: each channel to zero mean and unit variance, then placed at mean 0.5 and
#: standard deviation 0.25 on the 0-1 scale (the spread of a well-exposed natural image), so the
#: encoder's own mean/std normalisation sees inputs in the range it was trained on.
STD_CENTRE = 0.5
STD_SPREAD = 0.25

FRONTENDS = {
    "none": "RGB as it is",
    "gray": "luma (ITU-R BT.601) replicated to 3 channels",
    "gray-clahe": f"luma, CLAHE (clip {CLAHE_CLIP:g}, {CLAHE_GRID[0]}x{CLAHE_GRID[1]} tiles), 3 channels",
    "clahe": f"colour CLAHE: CLAHE on the L channel of CIELAB (clip {CLAHE_CLIP:g}), back to RGB",
    "std": "per-image, per-channel standardisation (mean 0.5, sd 0.25 on the 0-1 scale)",
    "gray-std": "luma standardised per image (mean 0.5, sd 0.25), 3 channels",
}
SEPARATOR = "+"


def check_frontend(name: str) -> str:
    """``name`` if it is a known front end, else an InputError listing them."""
    if name not in FRONTENDS:
        raise InputError(f"unknown front end {name!r}; choose from {', '.join(FRONTENDS)}")
    return name


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"effnet-lite0-gem+gray-clahe"`` -> (``"effnet-lite0-gem"``, ``"gray-clahe"``); no ``+``: (spec, None)."""
    base, sep, fe = spec.partition(SEPARATOR)
    return (base, check_frontend(fe.strip().lower())) if sep else (base, None)


def join_spec(base: str, frontend: str) -> str:
    """The explicit model spec an index records as the model's name: ``<model>+<front end>``."""
    return f"{base}{SEPARATOR}{check_frontend(frontend)}"


def tag_model_id(model_id: str, frontend: str) -> str:
    """The model id with the front end in its architecture part; ``none`` leaves it as it was."""
    if check_frontend(frontend) == "none":
        return model_id
    arch, sep, rest = model_id.partition("/")
    return f"{arch}{SEPARATOR}{frontend}{sep}{rest}"


def untag_model_id(model_id: str) -> str:
    """The model id without its front end: what names the network's weights and its ONNX export."""
    arch, sep, rest = model_id.partition("/")
    return arch.partition(SEPARATOR)[0] + sep + rest


def apply(frontend: str, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, H, W, 3) float32 on the 0-1 scale, per :data:`FRONTENDS`."""
    if frontend == "none":
        return images.astype(np.float32) / np.float32(255.0)
    fn = _FUNCS.get(frontend)
    if fn is None:
        check_frontend(frontend)
    out = np.empty(images.shape, np.float32)
    for i, img in enumerate(images):
        out[i] = fn(np.ascontiguousarray(img))
    return out


def _luma(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _clahe():
    import cv2

    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_GRID)


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _fe_gray(img: np.ndarray) -> np.ndarray:
    return _gray3(_luma(img).astype(np.float32) / np.float32(255.0))


def _fe_gray_clahe(img: np.ndarray) -> np.ndarray:
    return _gray3(_clahe().apply(_luma(img)).astype(np.float32) / np.float32(255.0))


def _fe_clahe(img: np.ndarray) -> np.ndarray:
    import cv2

    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    lab[..., 0] = _clahe().apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32) / np.float32(255.0)


def _standardise(x: np.ndarray) -> np.ndarray:
    """Per channel (last axis) to mean STD_CENTRE, sd STD_SPREAD; a flat channel becomes STD_CENTRE."""
    x = x.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    sd = x.std(axis=(0, 1), keepdims=True)
    return (np.float32(STD_CENTRE) + np.float32(STD_SPREAD) * (x - mean) / np.maximum(sd, 1e-3)).astype(
        np.float32
    )


def _fe_std(img: np.ndarray) -> np.ndarray:
    return _standardise(img)


def _fe_gray_std(img: np.ndarray) -> np.ndarray:
    return _gray3(_standardise(_luma(img)[..., None])[..., 0])


_FUNCS = {
    "gray": _fe_gray,
    "gray-clahe": _fe_gray_clahe,
    "clahe": _fe_clahe,
    "std": _fe_std,
    "gray-std": _fe_gray_std,
}
