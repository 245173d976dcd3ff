"""EarthMatch-style iterative coregistration of one photo against one candidate place.

1. Match the photo against a north-up view of the candidate (with some context around it) and fit a
   homography: photo pixel -> ground CRS.
2. Warp the ground into the photo's frame through that estimate, with a margin, read straight from the
   source imagery at the resolution the photo needs; match again (guided: only near where the estimate
   puts each keypoint) and compose the residual homography with the estimate.
3. Stop when the photo's corners move less than ``converge_px`` photo pixels, or after ``iterations``.

Everything is in the ground's own CRS (metres for a projected CRS); latitude is never interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..progress import CancelToken
from .ground import Ground, apply_h, corners, cv_matrix, scaling, translation
from .matching import Features, detect, fit_homography, match, match_guided


@dataclass(frozen=True)
class CoregParams:
    match_side: int = 768  # long side of the photo for matching (never upscaled)
    context: float = 2.0  # first view: candidate extent times this, centred on the candidate
    iterations: int = 5  # refinement passes after the first match
    margin: float = 0.25  # refinement views extend the photo frame by this fraction on each side
    ratio: float = 0.85  # ratio test of the first, unguided match
    guided_ratio: float = 0.9  # ratio test among keypoints near their predicted position
    guide_radius: float = 16.0  # px (photo matching scale) around the predicted position
    ransac_px: float = 4.0  # MAGSAC threshold, px in the view
    min_first_inliers: int = 5  # first, unguided match: a weak hypothesis is enough, refinement verifies
    min_inliers: int = 8  # fewer inliers at a refinement pass: this candidate is given up
    converge_px: float = 1.0  # corners moved less than this (photo matching px): converged
    verify_px: float = 6.0  # verification: an unguided match within this of its predicted place counts
    min_verified: int = 12  # verified matches that make a hypothesis final (no more tries on this candidate)
    min_verified_early: int = 3  # fewer after the 2nd pass: stop refining this hypothesis
    stretches: tuple[float, ...] = (2.0, 4.0)  # simulated anisotropic stretches when the plain photo fails
    max_stretched_side: int = 2048


DEFAULT_PARAMS = CoregParams()


@dataclass
class Attempt:
    """The outcome of coregistering a photo against one candidate."""

    h: np.ndarray | None  # photo pixel (GDAL convention, full resolution) -> ground CRS; None: failed
    inliers: int = 0
    matches: int = 0
    reproj_px: float = float("nan")  # median inlier residual of the last pass (photo matching px)
    passes: int = 0
    converged: bool = False
    last_shift_px: float = float("nan")
    verified: int = 0  # unguided matches landing where the final estimate predicts (see _verify)
    verify_matches: int = 0
    reason: str | None = None  # why it failed (None when h is set)
    history: list[dict] = field(default_factory=list)


def photo_for_matching(rgb: np.ndarray, match_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo resized for matching and the matrix taking full-resolution pixels to matching pixels."""
    h, w = rgb.shape[:2]
    s = min(1.0, match_side / max(h, w))
    if s == 1.0:
        return rgb, np.eye(3)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    return small, scaling(nw / w, nh / h)


def first_view(
    bounds: tuple[float, float, float, float], context: float, side: int
) -> tuple[np.ndarray, tuple]:
    """View (to_crs, shape) of a candidate's bounds grown ``context`` times about its centre, north up."""
    minx, miny, maxx, maxy = bounds
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    w, h = (maxx - minx) * context, (maxy - miny) * context
    px = max(w, h) / side
    cols, rows = max(1, round(w / px)), max(1, round(h / px))
    to_crs = np.array([[px, 0.0, cx - w / 2], [0.0, -px, cy + h / 2], [0.0, 0.0, 1.0]])
    return to_crs, (rows, cols)


class PhotoFeatures:
    """A photo prepared for matching once, whatever the number of candidates: its matching-scale image,
    features, and (on demand) the features of stretched copies.

    The stretched copies are an axis-aligned version of ASIFT's simulated tilts: a photo whose ground
    footprint is 3-5 times longer than wide but that was stored square (the ISS data), or a very oblique
    one, differs from the ground by an anisotropic scale SIFT does not absorb. Stretching the photo along
    one axis undoes it; the refinement then works in the photo's own frame again.
    """

    def __init__(self, rgb: np.ndarray, params: CoregParams) -> None:
        self.shape = rgb.shape[:2]
        self.small, self.to_match = photo_for_matching(rgb, params.match_side)
        self.features = detect(self.small)
        self.max_side = params.max_stretched_side
        self._variants: list[tuple[np.ndarray, Features]] | None = None

    def variants(self, stretches: tuple[float, ...]) -> list[tuple[np.ndarray, Features]]:
        """(A, features) for each stretch along x then y; A maps matching pixels to the stretched copy's."""
        if self._variants is None:
            out = []
            rows, cols = self.small.shape[:2]
            for t in stretches:
                for sx, sy in ((t, 1.0), (1.0, t)):
                    k = min(1.0, self.max_side / max(cols * sx, rows * sy))
                    a = scaling(sx * k, sy * k)
                    size = (max(1, round(cols * sx * k)), max(1, round(rows * sy * k)))
                    img = cv2.warpPerspective(self.small, cv_matrix(a), size, flags=cv2.INTER_LINEAR)
                    out.append((a, detect(img)))
            self._variants = out
        return self._variants


def coregister(
    photo: PhotoFeatures,
    ground: Ground,
    bounds: tuple[float, float, float, float],
    params: CoregParams = DEFAULT_PARAMS,
    cancel: CancelToken | None = None,
) -> Attempt:
    """Place ``photo`` on the ground around one candidate ``bounds`` (in ``ground.crs``), or say why not.

    Hypotheses from the first, unguided match (the photo as is, then its stretched copies if that fails)
    are refined and then verified; the first verified one is returned, else the best attempt with its
    reason. The returned ``h`` takes full-resolution photo pixels to the ground CRS.
    """
    side = round(max(photo.features.shape) * params.context)
    to_crs, shape = first_view(bounds, params.context, side)
    view = ground.view(to_crs, shape)
    if view.valid_fraction < 0.05:
        return Attempt(h=None, reason="no imagery under the candidate")
    feats = detect(view.rgb, view.valid)
    attempts: list[Attempt] = []
    tries = [(np.eye(3), photo.features)]
    for round_ in range(2):
        for a, pf in tries:
            if cancel is not None:
                cancel.check()
            ia, ib = match(pf, feats, params.ratio)
            est, inl = fit_homography(pf.xy[ia], feats.xy[ib], params.ransac_px)
            first = {
                "pass": 0,
                "matches": int(ia.size),
                "inliers": int(inl.sum()),
                "stretch": a.diagonal()[:2].round(3).tolist(),
            }
            if est is None or inl.sum() < params.min_first_inliers:
                reason = f"first match: {first['inliers']} inliers of {ia.size} matches"
                attempts.append(Attempt(h=None, reason=reason, history=[first]))
                continue
            att = _refine(photo, ground, view.to_crs @ est @ a, params, cancel)
            att.history.insert(0, first)
            attempts.append(att)
            if att.h is not None and att.verified >= params.min_verified:
                return att
        if round_ == 0:
            tries = photo.variants(params.stretches)
    return max(attempts, key=lambda t: (t.h is not None, t.verified, t.inliers, t.history[0]["inliers"]))


def _refine(
    photo: PhotoFeatures, ground: Ground, h_crs: np.ndarray, params: CoregParams, cancel: CancelToken | None
) -> Attempt:
    """The EarthMatch loop from one hypothesis ``h_crs`` (photo matching px -> CRS), then verification."""
    att = Attempt(h=None)
    pf = photo.features
    p_corners = corners(pf.shape)
    mw, mh = params.margin * pf.shape[1], params.margin * pf.shape[0]
    vshape = (round(pf.shape[0] + 2 * mh), round(pf.shape[1] + 2 * mw))
    offset = translation(-mw, -mh)  # view pixel -> photo matching pixel of the current estimate
    for k in range(1, params.iterations + 1):
        if cancel is not None:
            cancel.check()
        if not _sane(h_crs, p_corners):
            att.reason = f"pass {k}: the estimate folds or flips the photo"
            return att
        view = ground.view(h_crs @ offset, vshape)
        feats = detect(view.rgb, view.valid)
        ia, ib = match_guided(pf, feats, pf.xy + [mw, mh], params.guide_radius, params.guided_ratio)
        res, inl = fit_homography(pf.xy[ia], feats.xy[ib], params.ransac_px)
        n_in = int(inl.sum())
        if res is None or n_in < params.min_inliers:
            att.history.append({"pass": k, "matches": int(ia.size), "inliers": n_in})
            att.reason = f"pass {k}: {n_in} inliers of {ia.size} guided matches"
            return att
        # corner motion in photo matching pixels: the new estimate's corners in the old estimate's frame
        moved = apply_h(res, p_corners) - (p_corners + [mw, mh])
        shift = float(np.sqrt((moved**2).sum(1)).max())
        resid = apply_h(res, pf.xy[ia][inl]) - feats.xy[ib][inl]
        verified, vmatches = _verify(pf, feats, res, params)
        att.history.append(
            {
                "pass": k,
                "matches": int(ia.size),
                "inliers": n_in,
                "verified": verified,
                "shift_px": round(shift, 3),
            }
        )
        h_crs = view.to_crs @ res
        att.inliers, att.matches, att.passes = n_in, int(ia.size), k
        att.verified, att.verify_matches = verified, vmatches
        att.reproj_px = float(np.median(np.sqrt((resid**2).sum(1))))
        att.last_shift_px = shift
        if shift < params.converge_px:
            att.converged = True
            break
        if k >= 2 and verified < params.min_verified_early:
            att.reason = f"pass {k}: {verified} unguided matches agree with the estimate (wrong place)"
            return att
    if not _sane(h_crs, p_corners):
        att.reason = "the final estimate folds or flips the photo"
        return att
    att.h = h_crs @ photo.to_match
    return att


def _verify(pf: Features, feats: Features, res: np.ndarray, params: CoregParams) -> tuple[int, int]:
    """Unguided matches (photo vs the whole view) that land where ``res`` says, within ``verify_px``:
    (that count, all unguided matches).

    The refinement's inliers are helped by the estimate (matches are only searched near their predicted
    place, so a wrong place still collects a few dozen by chance). Here every keypoint competes with the
    whole view: a wrong place gets about ``matches * pi * verify_px^2 / view area`` (well under 1) by
    chance, a right one tens to hundreds. This count is what acceptance is calibrated on.
    """
    ia, ib = match(pf, feats, params.ratio)
    if ia.size == 0:
        return 0, 0
    err = np.sqrt(((apply_h(res, pf.xy[ia]) - feats.xy[ib]) ** 2).sum(1))
    return int((err < params.verify_px).sum()), int(ia.size)


def _sane(h: np.ndarray, p_corners: np.ndarray) -> bool:
    """The estimate keeps every photo corner in front of the camera (w > 0) and the image unflipped."""
    w = p_corners @ h[2, :2] + h[2, 2]
    if not (np.all(w > 0) or np.all(w < 0)):
        return False
    q = apply_h(h, p_corners)
    return bool(np.all(np.isfinite(q))) and _signed_area(q) < 0


def _signed_area(q: np.ndarray) -> float:
    """Shoelace area of a ring in (x east, y north); negative = clockwise, as a photo's UL, UR, LR, LL is."""
    x, y = q[:, 0], q[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
