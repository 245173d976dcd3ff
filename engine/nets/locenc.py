"""The GeoCLIP-design location encoder (also GAIR's) and the GeoCLIP weights shipped in the geoclip wheel.

Design (GeoCLIP, Vivanco et al. NeurIPS 2023; our own implementation):

1. Equal Earth projection of (lat, lon) in degrees, scaled by ``66.50336 / 180`` (x, y roughly in [-1, 1]).
2. Three capsules with random Fourier features at sigma 2^0, 2^4, 2^8: ``[cos, sin](2 pi B v)`` with a fixed
   ``B`` (256 x 2, stored in the weights as ``capsule.0.b``) -> 512, then ``Linear 512 -> 1024``, ReLU,
   ``1024 -> 1024``, ReLU, ``1024 -> 1024``, ReLU, and a head ``head.0`` to 512 (GeoCLIP) or 768 (GAIR).
3. The three capsule outputs are summed. The output is not normalised.

Coordinate order differs between the two published models: GeoCLIP's ``forward`` takes ``[lat, lon]``,
GAIR's takes ``[lon, lat]``. ``LocationEncoder(order=...)`` reproduces either ``forward``; callers use
``embed(lat, lon)``, which builds the right order, so they never have to know.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import InputError, WeightsError
from engine.nets.checkpoints import check_sha256, compare_state_dict, load_checkpoint

SIGMAS = (2.0**0, 2.0**4, 2.0**8)
RFF_FEATURES = 256
HIDDEN = 1024
GEOCLIP_DIM = 512
GAIR_DIM = 768
ORDERS = ("latlon", "lonlat")
BATCH = 8192

# Equal Earth projection constants (Savric, Patterson & Jenny 2018) and GeoCLIP's scale factor
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SCALE = 66.50336

GEOCLIP_NAME = "geoclip-location"
GEOCLIP_WEIGHTS = ("model", "weights", "location_encoder_weights.pth")  # inside the geoclip package
#: sha256 of ``location_encoder_weights.pth`` in the ``geoclip==1.3.0`` wheel (37,806,041 bytes).
GEOCLIP_SHA256 = "94b80ae3af89fca78539e129dd2929d321247f5ceeeb0a31bc2c31041a253394"


def equal_earth(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """(N,) lat, lon in degrees -> (N, 2) Equal Earth (x, y), scaled by 66.50336 / 180 as GeoCLIP does."""
    # Same operations in the same order as GeoCLIP: the sigma-256 capsule turns float32 rounding
    # differences of the projected point into visible output differences.
    sqrt3 = torch.sqrt(torch.tensor(3.0, dtype=lat.dtype, device=lat.device))
    lat_r, lon_r = torch.deg2rad(lat), torch.deg2rad(lon)
    theta = torch.asin((sqrt3 / 2) * torch.sin(lat_r))
    denominator = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * lon_r * torch.cos(theta)) / denominator
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SCALE) / 180


class FourierFeatures(nn.Module):
    """``v`` (N, 2) -> ``[cos(2 pi v B^T), sin(2 pi v B^T)]`` (N, 512), with ``b`` (256, 2) fixed."""

    def __init__(self, sigma: float, features: int = RFF_FEATURES):
        super().__init__()
        self.register_buffer("b", torch.randn(features, 2) * sigma)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * math.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class Capsule(nn.Module):
    """One frequency band: Fourier features, a 3-layer ReLU MLP (``capsule.{1,3,5}``), a linear ``head.0``."""

    def __init__(self, sigma: float, out_dim: int):
        super().__init__()
        self.capsule = nn.Sequential(
            FourierFeatures(sigma),
            nn.Linear(2 * RFF_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(HIDDEN, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class LocationEncoder(nn.Module):
    """(N, 2) coordinates in degrees, in ``order`` -> (N, out_dim) embedding, the sum of the capsules.

    ``order="latlon"`` is GeoCLIP's input, ``order="lonlat"`` GAIR's. Prefer :meth:`embed`.
    """

    def __init__(self, out_dim: int = GEOCLIP_DIM, order: str = "latlon", sigmas: tuple[float, ...] = SIGMAS):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.out_dim = out_dim
        self.n = len(sigmas)
        for i, sigma in enumerate(sigmas):
            self.add_module(f"LocEnc{i}", Capsule(sigma, out_dim))
        self.model_id = ""  # set by the loaders

    def extra_repr(self) -> str:
        return f"order={self.order}, out_dim={self.out_dim}"

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        first, second = coords[:, 0].float(), coords[:, 1].float()
        lat, lon = (first, second) if self.order == "latlon" else (second, first)
        x = equal_earth(lat, lon)
        out = self.LocEnc0(x)
        for i in range(1, self.n):
            out = out + getattr(self, f"LocEnc{i}")(x)
        return out

    @torch.no_grad()
    def embed(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Latitudes, longitudes in degrees (WGS84) -> (N, out_dim) float32 raw embeddings (not normalised)."""
        lat_a = np.atleast_1d(np.asarray(lat, dtype=np.float64)).ravel()
        lon_a = np.atleast_1d(np.asarray(lon, dtype=np.float64)).ravel()
        if lat_a.shape != lon_a.shape:
            raise InputError(f"lat and lon differ in length: {lat_a.size} vs {lon_a.size}")
        if not (np.isfinite(lat_a).all() and np.isfinite(lon_a).all()):
            raise InputError("lat/lon must be finite numbers")
        if np.abs(lat_a).max(initial=0) > 90 or np.abs(lon_a).max(initial=0) > 180:
            raise InputError("lat must be within [-90, 90] and lon within [-180, 180] degrees")
        pairs = np.stack([lat_a, lon_a] if self.order == "latlon" else [lon_a, lat_a], axis=1)
        param = next(self.parameters())
        coords = torch.from_numpy(pairs.astype(np.float32))
        was_training = self.training
        self.eval()
        try:
            out = [
                self(coords[i : i + BATCH].to(param.device)).float().cpu()
                for i in range(0, len(coords), BATCH)
            ]
        finally:
            self.train(was_training)
        if not out:
            return np.zeros((0, self.out_dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def geoclip_weights_path() -> Path:
    """``location_encoder_weights.pth`` of the installed ``geoclip`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("geoclip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "the GeoCLIP location encoder needs the 'geoclip' package, which ships its weights "
            "(pip install geoclip==1.3.0)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*GEOCLIP_WEIGHTS)
        if path.is_file():
            return path
    raise WeightsError(
        f"the installed 'geoclip' package has no {'/'.join(GEOCLIP_WEIGHTS)} "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall geoclip==1.3.0"
    )


def load_geoclip_location_encoder(sha256: str | None = None) -> LocationEncoder:
    """GeoCLIP's pretrained location encoder ([lat, lon] order, 512-d), from the weights in the geoclip wheel.

    ``sha256`` (all 64 hex digits) defaults to the digest of the file shipped in geoclip 1.3.0; a different
    file raises WeightsError. The model is in eval mode; ``model_id`` is ``geoclip-location/sha256:xxxxxxxx``.
    """
    path = geoclip_weights_path()
    digest = check_sha256(path, sha256 or GEOCLIP_SHA256)
    state = load_checkpoint(path)
    model = LocationEncoder(GEOCLIP_DIM, order="latlon")
    report = compare_state_dict(model, state)
    if not report.ok:
        raise WeightsError(f"{path} is not a GeoCLIP location encoder: {report.summary()}")
    model.load_state_dict(state, strict=True)
    model.model_id = f"{GEOCLIP_NAME}/sha256:{digest[:8]}"
    return model.eval()
