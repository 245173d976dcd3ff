"""EarthMatch-style iterative coregistration of one photo against one candidate place.

1. Match the photo against a north-up view of the candidate (with some context around it) and fit a
   homography: photo pixel -> ground CRS.
2. Warp the ground into the photo's frame through that estimate, with a margin, read straight from the
   source imagery at the resolution the photo needs; match again (guided: only near where the estimate
   puts each keypoint) and compose the residual homography with the estimate.
3. Stop when the photo's corners move less than ``converge_px`` photo pixels, or after ``iterations``.

Everything is in the ground's own CRS (metres for a projected CRS); latitude is never interpolated.

The same loop, verification and acceptance serve every matcher (``CoregParams.matcher``): with SIFT the
refinement matches are guided and verification re-matches unguided; with a learned matcher (ALIKED/DISK +
LightGlue, ``learned.py``) every pass matches the whole view and verification counts the matches that land
where the final estimate puts them. LightGlue is not rotation-invariant, so its first match is preceded by
an orientation search over the photo's 4 right-angle turns (``_orient``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ..geo.homography import apply_h, corners, cv_matrix, scaling, translation
from ..imagery.views import Ground
from ..progress import CancelToken, ProgressFn, no_progress
from . import learned
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
    #: sift | aliked | disk | auto (learned.MATCHERS). auto by default: SIFT's results, plus the learned search
    #: where SIFT places nothing (README "Footprints": 20 of 23 ISS photos vs 19, same wrong: 0)
    matcher: str = "auto"
    #: learned matchers: verified matches that accept. On ../shared/data/iss wrong candidates reached at most
    #: 11 (full learned search, 32 tried; 0 of 40 on all 26 photos) while right ones reached 57-560
    #: (bench/results/footprint_iss*.txt). Higher than SIFT's 12: LightGlue's own matches are counted.
    min_verified_learned: int = 16
    learned_iterations: int = 3  # LightGlue is precise: on a right place the loop settles in 1-2 passes
    orient_keypoints: int = 256  # orientation search: strongest keypoints of the photo (view: twice that)
    #: an accepted candidate with this many times its threshold of verified matches ends the search
    strong_factor: float = 4.0
    #: ``auto``: where SIFT accepts no candidate, the learned search runs on this many best-ranked ones (its
    #: full search costs 5-10 s per candidate on 2 CPU cores, about 0.2 s on a GPU)
    auto_learned_top: int = 5

    def min_verified_for(self, matcher: str) -> int:
        """The acceptance threshold of ``matcher`` (verification counts differ in scale between them)."""
        return self.min_verified if matcher == "sift" else self.min_verified_learned

    def with_matcher(self, matcher: str) -> CoregParams:
        return replace(self, matcher=matcher)


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
    matcher: str = "sift"
    turn: int = 0  # learned matchers: the photo was turned by np.rot90(k=turn) to match north-up imagery
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
        self._turned: dict[tuple[str, int], tuple[np.ndarray, Features]] = {}

    def turned(self, name: str, k: int) -> tuple[np.ndarray, Features]:
        """(R, learned features) of the matching-scale photo turned by ``np.rot90(k)`` (counter-clockwise);
        R maps matching pixels to the turned image's pixels. Computed once per photo, matcher and turn."""
        key = (name, k % 4)
        if key not in self._turned:
            img = np.ascontiguousarray(np.rot90(self.small, k % 4))
            self._turned[key] = (turn_matrix(k, self.small.shape[:2]), learned.get(name).detect(img))
        return self._turned[key]

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


def turn_matrix(k: int, shape: tuple[int, int]) -> np.ndarray:
    """Pixel (GDAL) of an image of ``shape`` -> pixel of ``np.rot90(image, k)``."""
    m = np.eye(3)
    rows, cols = shape
    for _ in range(k % 4):
        m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, cols], [0.0, 0.0, 1.0]]) @ m
        rows, cols = cols, rows
    return m


def hint_turn(rotation_deg: float | None) -> int | None:
    """The turn that brings a photo north up, from a retrieval rotation (the photo is the tile turned this
    much counter-clockwise; README "What you get"), to the nearest right angle."""
    if rotation_deg is None or not np.isfinite(rotation_deg):
        return None
    return int(-round(rotation_deg / 90.0)) % 4


def coregister(
    photo: PhotoFeatures,
    ground: Ground,
    bounds: tuple[float, float, float, float],
    params: CoregParams = DEFAULT_PARAMS,
    cancel: CancelToken | None = None,
    rotation: float | None = None,
    progress: ProgressFn = no_progress,
) -> Attempt:
    """Place ``photo`` on the ground around one candidate ``bounds`` (in ``ground.crs``), or say why not.

    Hypotheses from the first, unguided match (the photo as is, then its stretched copies if that fails)
    are refined and then verified; the first verified one is returned, else the best attempt with its
    reason. The returned ``h`` takes full-resolution photo pixels to the ground CRS. ``rotation`` (degrees,
    the retrieval's) is tried first by the learned matchers' orientation search. ``progress`` hears each
    refinement pass (fraction of the passes, what it found).
    """
    if params.matcher in learned.LEARNED:
        return _coregister_learned(photo, ground, bounds, params, cancel, hint_turn(rotation), progress)
    progress(0.0, "first match")
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
            att = _refine(photo, ground, view.to_crs @ est @ a, params, cancel, progress=progress)
            att.history.insert(0, first)
            attempts.append(att)
            if att.h is not None and att.verified >= params.min_verified:
                return att
        if round_ == 0:
            tries = photo.variants(params.stretches)
    return max(attempts, key=lambda t: (t.h is not None, t.verified, t.inliers, t.history[0]["inliers"]))


def _refine(
    photo: PhotoFeatures,
    ground: Ground,
    h_crs: np.ndarray,
    params: CoregParams,
    cancel: CancelToken | None,
    lm: learned.LearnedMatcher | None = None,
    progress: ProgressFn = no_progress,
) -> Attempt:
    """The EarthMatch loop from one hypothesis ``h_crs`` (photo matching px -> CRS), then verification.

    SIFT (``lm`` None): guided matches near the predicted places, verification by an unguided re-match.
    Learned (``lm``): LightGlue matches the photo (unturned: the view is in its frame) with the whole view;
    verification counts those matches within ``verify_px`` of the final estimate."""
    att = Attempt(h=None, matcher="sift" if lm is None else lm.name)
    pf = photo.features if lm is None else photo.turned(lm.name, 0)[1]
    iterations = params.iterations if lm is None else params.learned_iterations
    p_corners = corners(pf.shape)
    mw, mh = params.margin * pf.shape[1], params.margin * pf.shape[0]
    vshape = (round(pf.shape[0] + 2 * mh), round(pf.shape[1] + 2 * mw))
    offset = translation(-mw, -mh)  # view pixel -> photo matching pixel of the current estimate
    for k in range(1, iterations + 1):
        if cancel is not None:
            cancel.check()
        if not _sane(h_crs, p_corners):
            att.reason = f"pass {k}: the estimate folds or flips the photo"
            return att
        view = ground.view(h_crs @ offset, vshape)
        if lm is None:
            feats = detect(view.rgb, view.valid)
            ia, ib = match_guided(pf, feats, pf.xy + [mw, mh], params.guide_radius, params.guided_ratio)
        else:
            feats = lm.detect(view.rgb, view.valid)
            ia, ib = lm.match(pf, feats)
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
        if lm is None:
            verified, vmatches = _verify(pf, feats, res, params)
        else:
            err = np.sqrt(((apply_h(res, pf.xy[ia]) - feats.xy[ib]) ** 2).sum(1))
            verified, vmatches = int((err < params.verify_px).sum()), int(ia.size)
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
        progress(k / iterations, f"pass {k}: {verified} verified, moved {shift:.0f} px")
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


def _coregister_learned(
    photo: PhotoFeatures,
    ground: Ground,
    bounds: tuple[float, float, float, float],
    params: CoregParams,
    cancel: CancelToken | None,
    hint: int | None,
    progress: ProgressFn = no_progress,
) -> Attempt:
    """The learned path: first view (features cached per tile), orientation search, one full match at the
    best turn(s), then the same refinement loop and verification as SIFT's, with LightGlue matches."""
    name = params.matcher
    lm = learned.get(name)
    side = round(max(photo.small.shape[:2]) * params.context)
    to_crs, shape = first_view(bounds, params.context, side)
    key = (id(ground), name, tuple(np.round(to_crs.ravel(), 9)), shape)
    cached = learned.VIEW_CACHE.get(key)
    if cached is None or cached[0] is not ground:
        view = ground.view(to_crs, shape)
        feats = lm.detect(view.rgb, view.valid) if view.valid_fraction >= 0.05 else None
        cached = (ground, view.to_crs, feats)
        learned.VIEW_CACHE.put(key, cached)
    _, view_to_crs, feats = cached
    if feats is None:
        return Attempt(h=None, reason="no imagery under the candidate", matcher=name)
    progress(0.0, "orientation search")
    turns = _orient(photo, feats, params, lm, hint, cancel)
    attempts: list[Attempt] = []
    for k, coarse in turns:
        if cancel is not None:
            cancel.check()
        rot, pf = photo.turned(name, k)
        ia, ib = lm.match(pf, feats)
        est, inl = fit_homography(pf.xy[ia], feats.xy[ib], params.ransac_px)
        first = {"pass": 0, "matches": int(ia.size), "inliers": int(inl.sum()), "turn": k, "coarse": coarse}
        if est is None or inl.sum() < params.min_first_inliers:
            reason = f"first match (turn {90 * k} deg): {first['inliers']} inliers of {ia.size} matches"
            attempts.append(Attempt(h=None, reason=reason, history=[first], matcher=name, turn=k))
            continue
        att = _refine(photo, ground, view_to_crs @ est @ rot, params, cancel, lm, progress)
        att.history.insert(0, first)
        att.turn = k
        attempts.append(att)
        if att.h is not None and att.verified >= params.min_verified_for(name):
            return att
    if not attempts:
        return Attempt(h=None, reason="orientation search: no turn of the photo matches", matcher=name)
    return max(attempts, key=lambda t: (t.h is not None, t.verified, t.inliers, t.history[0]["inliers"]))


def _orient(
    photo: PhotoFeatures,
    feats: Features,
    params: CoregParams,
    lm: learned.LearnedMatcher,
    hint: int | None,
    cancel: CancelToken | None,
) -> list[tuple[int, int]]:
    """Turns of the photo worth a full match, best first, as (k, coarse inliers).

    Cheap: the strongest ``orient_keypoints`` of the photo against twice as many of the view (LightGlue's
    cost grows with the product). A known turn (``hint``) that already gives a clear homography is taken
    alone. Turns below ``min_first_inliers`` are dropped; at most the best two are returned.
    """
    n = params.orient_keypoints
    b = _strongest(feats, 2 * n)
    order = [hint] + [k for k in range(4) if k != hint] if hint is not None else list(range(4))
    scored: list[tuple[int, int]] = []
    for k in order:
        if cancel is not None:
            cancel.check()
        a = _strongest(photo.turned(lm.name, k)[1], n)
        ia, ib = lm.match(a, b)
        _, inl = fit_homography(a.xy[ia], b.xy[ib], params.ransac_px)
        scored.append((k, int(inl.sum())))
        if k == hint and scored[-1][1] >= 3 * params.min_first_inliers:
            return scored
    scored.sort(key=lambda t: -t[1])
    return [t for t in scored[:2] if t[1] >= params.min_first_inliers]


def _strongest(f: Features, n: int) -> Features:
    """The ``n`` strongest keypoints (learned features are stored strongest first)."""
    if len(f) <= n:
        return f
    return Features(f.xy[:n], f.desc[:n], f.shape, None if f.scores is None else f.scores[:n])


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
