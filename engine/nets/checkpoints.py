"""Loading published checkpoints safely and mapping their key layouts onto our modules.

Checkpoints are read with ``torch.load(weights_only=True)`` only: a checkpoint is data from the
internet and a full unpickle would run arbitrary code. Layouts understood (all mapped onto
``backbone.*`` = timm DINOv2 ViT names and ``aggregator.agg.*`` / ``aggregator.linear.*``):

- MegaLoc / AstroLoc: ``backbone.{patch_embed, cls_token, pos_embed, blocks.N.*, norm}``,
  ``aggregator.agg.{token_features, cluster_features, score, dust_bin}``, ``aggregator.linear``.
- SALAD's own: ``backbone.model.*`` and ``aggregator.{token_features, ...}`` (no linear: 8448-d).
- Original DINOv2 names: bare ``patch_embed...``/``blocks...`` keys, chunked ``blocks.C.N.*``
  (the inner index is already global in DINOv2's chunks), ``mask_token`` (unused at inference).
- Any of these wrapped in ``{'state_dict': ...}`` / ``{'model': ...}`` or saved from DataParallel
  (``module.`` prefix) or torch.compile (``_orig_mod.`` prefix).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.errors import WeightsError
from engine.nets.salad import SaladConfig

SALAD_PARTS = ("token_features", "cluster_features", "score", "dust_bin")
IGNORED_KEYS = ("backbone.mask_token",)  # present in DINOv2 checkpoints, unused for inference
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What happened when a state dict went into a model (keys in our module's naming)."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    ignored: list[str] = field(default_factory=list)  # known-useless keys dropped on purpose

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.shape_mismatch),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {_head(keys)}")
        return "; ".join(parts)


def _head(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------- files


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, cached per (path, mtime, size) so repeated model builds do not re-hash."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def normalize_sha256(expected: str) -> str:
    """The 64 lowercase hex digits of ``expected`` (``sha256:`` prefix allowed); WeightsError otherwise.

    Why the full digest: an 8-digit prefix is 32 bits, which a crafted file can match in minutes; the point
    of pinning weights is that no other file passes.
    """
    want = str(expected).strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise WeightsError(
            f"expected sha256 {expected!r} is not a full sha256: give all 64 hex digits "
            f"(as `sha256sum FILE` prints), not a prefix ({len(want)} characters given)"
        )
    return want


def check_sha256(path: str | os.PathLike, expected: str) -> str:
    """Return the file's sha256; WeightsError if it is not ``expected`` (all 64 hex digits)."""
    want = normalize_sha256(expected)
    got = sha256_file(path)
    if got != want:
        raise WeightsError(f"sha256 mismatch for {path}: expected {want}, file has {got}")
    return got


def load_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` dict (unwrapped, prefixes stripped), never unpickling code."""
    return flatten_state_dict(read_checkpoint(path, expected_sha256), str(path))


def read_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> object:
    """The checkpoint's top-level object (e.g. ``{'model': ..., 'optimizer': ...}``), read weights-only.

    To admit a known-harmless class such as an ``argparse.Namespace`` of training arguments, call this
    inside ``torch.serialization.safe_globals([argparse.Namespace])``; any other object still raises
    WeightsError.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"checkpoint not found: {p}")
    if expected_sha256:
        check_sha256(p, expected_sha256)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if not found:
            raise WeightsError(f"cannot read checkpoint {p}: not a PyTorch checkpoint, or corrupt") from exc
        raise WeightsError(
            f"{p} holds Python objects ({found.group(1)}) that a safe load (weights_only=True) refuses to "
            "unpickle. Extract its tensors where you trust the file, e.g. "
            "torch.save(ckpt['state_dict'], 'weights.pt'), and load that."
        ) from exc
    except Exception as exc:  # zip/format errors of a corrupt or foreign file
        raise WeightsError(f"cannot read checkpoint {p}: {exc}") from exc
    return obj


def flatten_state_dict(obj: object, where: str) -> dict[str, torch.Tensor]:
    """A checkpoint object's tensors as a flat dict: wrappers (``{'model': ...}``) removed, prefixes cut."""
    for _ in range(3):  # nested wrappers such as {'model': {'state_dict': ...}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where} is not a state dict (got {type(obj).__name__})")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{where} holds no tensors")
    return {_strip_prefixes(k): v for k, v in sd.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


# ------------------------------------------------------------------------------------------- layouts

_CHUNKED_BLOCK = re.compile(r"^backbone\.blocks\.\d+\.(\d+)\.")
_BARE_BACKBONE = (
    "patch_embed.",
    "blocks.",
    "cls_token",
    "pos_embed",
    "norm.",
    "mask_token",
    "register_tokens",
)


def map_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename any supported published layout to ours (``backbone.*``, ``aggregator.agg.*``, ``aggregator.linear.*``)."""
    bare = not any(k.startswith(("backbone.", "aggregator.")) for k in sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _map_key(key, bare)
        if new in out:
            raise WeightsError(f"two checkpoint keys map to {new}; is this a merged checkpoint?")
        out[new] = value
    return out


def _map_key(key: str, bare: bool) -> str:
    if bare and key.startswith(_BARE_BACKBONE):
        key = "backbone." + key
    if key.startswith("backbone.model."):
        key = "backbone." + key[len("backbone.model.") :]
    key = _CHUNKED_BLOCK.sub(r"backbone.blocks.\1.", key)
    for part in SALAD_PARTS:
        if key == f"aggregator.{part}" or key.startswith(f"aggregator.{part}."):
            return "aggregator.agg." + key[len("aggregator.") :]
    return key


def infer_salad_config(sd: Mapping[str, torch.Tensor]) -> tuple[SaladConfig, int | None]:
    """(SALAD shape, linear output dim or None) read from the tensors of a mapped state dict."""
    need = {
        "score": "aggregator.agg.score.3.weight",
        "score_in": "aggregator.agg.score.0.weight",
        "cluster": "aggregator.agg.cluster_features.3.weight",
        "token": "aggregator.agg.token_features.2.weight",
    }
    absent = [k for k in need.values() if k not in sd]
    if absent:
        raise WeightsError(f"checkpoint has no SALAD aggregator (missing {_head(absent)})")
    mlp_dim, channels = sd[need["score_in"]].shape[:2]
    cfg = SaladConfig(
        num_channels=int(channels),
        num_clusters=int(sd[need["score"]].shape[0]),
        cluster_dim=int(sd[need["cluster"]].shape[0]),
        token_dim=int(sd[need["token"]].shape[0]),
        mlp_dim=int(mlp_dim),
    )
    linear = sd.get("aggregator.linear.weight")
    if linear is None:
        return cfg, None
    if linear.ndim != 2 or linear.shape[1] != cfg.out_dim:
        raise WeightsError(
            f"aggregator.linear.weight has shape {tuple(linear.shape)}, expected (D, {cfg.out_dim}) "
            f"for SALAD with {cfg.num_clusters}x{cfg.cluster_dim}+{cfg.token_dim}"
        )
    return cfg, int(linear.shape[0])


# ------------------------------------------------------------------------------------------- loading


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    allow_missing: bool = False,
    backbone_prefix: str = "backbone.",
) -> LoadReport:
    """Copy a (mapped) state dict into ``model`` and say what did not fit.

    Raises WeightsError, naming the keys, on any shape mismatch, when most ``backbone_prefix`` keys
    are missing (wrong kind of checkpoint), or on other missing keys unless ``allow_missing``.
    A few unexpected keys only warn: they are listed in the returned report.
    """
    report = compare_state_dict(model, state_dict)
    _raise_if_unusable(model, report, allow_missing, backbone_prefix)
    if report.unexpected:
        warnings.warn(f"checkpoint keys not used by the model: {_head(report.unexpected)}", stacklevel=2)
    skip = set(report.unexpected) | set(report.ignored)
    usable = {k: v for k, v in state_dict.items() if k not in skip}
    model.load_state_dict(usable, strict=False)
    return report


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Key-by-key comparison of a state dict with a model, without loading anything."""
    own = model.state_dict()
    report = LoadReport()
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.shape_mismatch.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
        else:
            report.loaded += 1
    report.missing = [k for k in own if k not in state_dict]
    return report


def _raise_if_unusable(model: nn.Module, report: LoadReport, allow_missing: bool, prefix: str) -> None:
    if report.shape_mismatch:
        raise WeightsError(f"checkpoint does not fit {type(model).__name__}: {_head(report.shape_mismatch)}")
    n_backbone = sum(1 for k in model.state_dict() if k.startswith(prefix))
    missing_backbone = [k for k in report.missing if k.startswith(prefix)]
    if n_backbone and len(missing_backbone) > n_backbone / 2:
        raise WeightsError(
            f"{len(missing_backbone)} of {n_backbone} backbone weights are missing from the checkpoint "
            f"(e.g. {_head(missing_backbone, 4)}); unexpected keys look like {_head(report.unexpected, 4)}. "
            "Is this a DINOv2/MegaLoc/AstroLoc-style checkpoint?"
        )
    if report.missing and not allow_missing:
        raise WeightsError(f"checkpoint lacks {len(report.missing)} weights: {_head(report.missing)}")
