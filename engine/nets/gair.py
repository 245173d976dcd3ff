"""GAIR (geo-aligned implicit representations): its networks and one loader for the published checkpoint.

Parts of ``GairModel`` (names = the checkpoint's keys, Hugging Face ``PingL/GAIR``, ``checkpoint.pth``):

- ``rs_encoder.s2_encoder``: CROMA's optical ViT-B/8 (``engine.nets.croma``), 10 Sentinel-2 bands, 96 px.
  ``rs_encoder.layer_norm`` (LayerNorm 768) and ``rs_encoder.head`` (``Linear(768, 10)`` in GAIR's code, a
  leftover classifier of its CROMA wrapper) are loaded for completeness but unused: GAIR uses the patch
  tokens (NILI) and their mean, never the head.
- ``imnet``: NILI's decoder ``Linear(9 * 768 + 2 -> 768)`` over a 3x3-unfolded patch feature and the
  query's offset from the cell centre (the NILI query itself lives elsewhere in the engine).
- ``location_encoder``: GeoCLIP-design encoder with a 768-d head, taking ``[lon, lat]``
  (``engine.nets.locenc``; use :meth:`GairModel.location_embed`, which takes lat, lon).
- ``sv_encoder``: street-view ViT-B/16 (``engine.nets.streetview``); optional in the checkpoint.
- ``optical_proj``, ``location_proj``, ``radar_proj`` (``Linear(768, 768)``) and ``logit_scale``: from the
  contrastive head. For retrieval the street-view embedding goes through ``optical_proj``; localized RS
  embeddings and location embeddings are used unprojected (as in GAIR's training loss).

Training-only tensors in the checkpoint are dropped on purpose and listed in ``report.ignored``:
``nerf_fn.*`` / ``query_feature`` / ``rs_patch_pos_encoding`` (an unused query variant), ``*_teacher.*``
(distillation teachers), ``queue_*`` (MoCo queues), ``ContrastLoss.*``, ``*_student_projector.*``, and the
non-model entries of the pickle (optimizer, epoch, args, ...).

Final LayerNorm: GAIR's training encoder ends with ``transformer.norm_out``, the released inference encoder
does not apply it (its loader dropped the key). ``load_gair(final_norm=False)`` follows the release and
lists the key as ignored; ``final_norm=True`` applies it (a different model id). Which one the NILI decoder
expects was not verified on the real checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import WeightsError
from engine.nets.checkpoints import (
    WRAPPER_KEYS,
    LoadReport,
    compare_state_dict,
    flatten_state_dict,
    read_checkpoint,
    sha256_file,
)
from engine.nets.croma import DIM, CromaOptical
from engine.nets.locenc import GAIR_DIM, LocationEncoder
from engine.nets.streetview import build_sv_encoder, encode_photo, to_model_layout

NAME = "gair"
EMBED_DIM = DIM
NILI_IN = 9 * DIM + 2  # 3x3 unfolded patch feature + (dx, dy)
RS_HEAD_DIM = 10  # GAIR builds its CROMA wrapper with num_classes=10; the head is unused

REQUIRED = ("rs_encoder.s2_encoder.", "imnet.", "location_encoder.")
SV = "sv_encoder."
NORM_OUT = "rs_encoder.s2_encoder.transformer.norm_out."
_IGNORED = re.compile(
    r"^(nerf_fn\.|query_feature$|rs_patch_pos_encoding$|\w+_teacher\.|queue_|ContrastLoss\."
    r"|\w+_student_projector\.)"
)
_SV_ABSENT = SV + "* (absent from the checkpoint)"


class RsEncoder(nn.Module):
    """GAIR's ``rs_encoder``: the CROMA optical encoder, plus the wrapper's ``layer_norm``/``head`` (unused)."""

    def __init__(self, head_dim: int = RS_HEAD_DIM, final_norm: bool = False):
        super().__init__()
        self.s2_encoder = CromaOptical(final_norm=final_norm)
        self.layer_norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s2_encoder(x)


class GairModel(nn.Module):
    """GAIR's inference parts; build with :func:`load_gair`. See the module docstring for each part."""

    def __init__(self, with_sv: bool = True, rs_head_dim: int = RS_HEAD_DIM, final_norm: bool = False):
        super().__init__()
        self.rs_encoder = RsEncoder(rs_head_dim, final_norm)
        self.imnet = nn.Linear(NILI_IN, EMBED_DIM)
        self.location_encoder = LocationEncoder(GAIR_DIM, order="lonlat")
        self.sv_encoder = build_sv_encoder() if with_sv else None
        self.radar_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.optical_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.location_proj = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)
        self.report = LoadReport()
        self.model_id = f"{NAME}/untrained"
        #: why photo_embed cannot run (None when it can)
        self.photo_unavailable: str | None = None if with_sv else "the model has no street-view encoder"

    @torch.no_grad()
    def rs_patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10, 96, 96) normalised Sentinel-2 -> (B, 768, 12, 12) patch features (multiples of 8 work)."""
        return self.rs_encoder.s2_encoder.patch_grid(x)

    def location_embed(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Latitudes, longitudes in degrees -> (N, 768) float32 GAIR location embeddings, raw (unprojected)."""
        return self.location_encoder.embed(lat, lon)

    @torch.no_grad()
    def photo_embed(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 ground photo -> (768,) float32: street-view pooler through ``optical_proj``."""
        if self.sv_encoder is None or self.photo_unavailable:
            raise WeightsError(
                f"photo embeddings are unavailable for {self.model_id}: {self.photo_unavailable}"
            )
        pooled = torch.from_numpy(encode_photo(self.sv_encoder, rgb))
        param = self.optical_proj.weight
        return self.optical_proj(pooled.to(param.device, param.dtype)).float().cpu().numpy()


def load_gair(path: str | os.PathLike, sha256: str | None = None, final_norm: bool = False) -> GairModel:
    """GAIR's published checkpoint -> ``GairModel`` in eval mode, with ``.report`` and ``.model_id``.

    Reads ``{'model': state_dict, ...}`` (or a bare state dict) with ``weights_only=True``, admitting only
    ``argparse.Namespace`` (GAIR saves its training args); strips ``module.``. Raises WeightsError naming the
    keys when ``rs_encoder.s2_encoder``, ``imnet`` or ``location_encoder`` is missing, incomplete, has extra
    keys or wrong shapes. An absent or unusable ``sv_encoder`` is allowed (reported; ``photo_embed`` then
    raises). Unexpected keys elsewhere only warn.
    """
    p = Path(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = read_checkpoint(p, sha256)
    digest = sha256_file(p)
    state = flatten_state_dict(obj, str(p))
    ignored = _entries_outside_state(obj)
    del obj  # optimizer state etc.

    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _IGNORED.match(key) or (not final_norm and key.startswith(NORM_OUT)):
            ignored.append(key)
        else:
            kept[key] = value
    if final_norm and NORM_OUT + "weight" not in kept:
        raise WeightsError(f"final_norm=True but {p} has no {NORM_OUT}weight")

    head = kept.get("rs_encoder.head.weight")
    head_dim = int(head.shape[0]) if head is not None and head.ndim == 2 else RS_HEAD_DIM
    has_sv = any(k.startswith(SV) for k in kept)
    model = GairModel(with_sv=has_sv, rs_head_dim=head_dim, final_norm=final_norm)
    if model.sv_encoder is not None:
        sv = to_model_layout({k[len(SV) :]: v for k, v in kept.items() if k.startswith(SV)}, model.sv_encoder)
        kept = {k: v for k, v in kept.items() if not k.startswith(SV)} | {SV + k: v for k, v in sv.items()}

    report = compare_state_dict(model, kept)
    report.ignored = ignored
    _raise_if_required_incomplete(report, p)

    sv_problems = _with_prefix(report, SV)
    if not has_sv:
        report.missing.append(_SV_ABSENT)
        model.photo_unavailable = "the checkpoint has no street-view encoder (sv_encoder.*)"
    elif sv_problems:
        model.sv_encoder = None
        model.photo_unavailable = f"the checkpoint's street-view encoder does not fit: {_head(sv_problems)}"
    other = [k for k in report.unexpected if not k.startswith(SV)]
    if other:
        warnings.warn(f"GAIR checkpoint keys not used by the model: {_head(other)}", stacklevel=2)
    if not model.photo_unavailable and _with_prefix(report, "optical_proj."):
        model.photo_unavailable = "the checkpoint's optical_proj is missing or has the wrong shape"

    own = model.state_dict()
    usable = {k: v for k, v in kept.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)
    model.report = report
    model.model_id = f"{NAME}{'-finalnorm' if final_norm else ''}/sha256:{digest[:8]}"
    return model.eval()


def _entries_outside_state(obj: object) -> list[str]:
    """Top-level pickle entries that are not the state dict (optimizer, epoch, args, ...)."""
    if not isinstance(obj, Mapping) or any(isinstance(v, torch.Tensor) for v in obj.values()):
        return []
    holder = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    return [f"{k} (checkpoint entry)" for k in obj if k != holder]


def _with_prefix(report: LoadReport, prefix: str | tuple[str, ...]) -> list[str]:
    return [k for k in report.missing + report.unexpected + report.shape_mismatch if k.startswith(prefix)]


def _raise_if_required_incomplete(report: LoadReport, path: Path) -> None:
    parts = []
    for label, keys in (
        ("missing", [k for k in report.missing if k.startswith(REQUIRED)]),
        ("unexpected", [k for k in report.unexpected if k.startswith(REQUIRED)]),
        ("shape mismatch", [k for k in report.shape_mismatch if k.startswith(REQUIRED)]),
    ):
        if keys:
            parts.append(f"{len(keys)} {label}: {_head(keys)}")
    if parts:
        raise WeightsError(
            f"{path} is not a usable GAIR checkpoint (rs_encoder.s2_encoder, imnet and location_encoder "
            "must match exactly): " + "; ".join(parts)
        )


def _head(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")
