"""Local features and robust homographies with OpenCV: RootSIFT, ratio + mutual checks, USAC MAGSAC++.

Why these: they run offline on a CPU with no weights, and SIFT is invariant to the rotation and (within an
octave or two) the scale differences between an astronaut photo and a satellite mosaic. What SIFT cannot
do alone, separate true matches from the repeated texture of farmland or dunes, is handled by the
iteration in ``coregister``: once the ground is warped into the photo's frame, matches are searched only
near where the current estimate puts them (``match_guided``), which wrong candidates cannot satisfy.

All coordinates here are GDAL pixel coordinates (centres at +0.5): OpenCV keypoints are shifted on the
way out.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Keypoints kept per image (strongest first).
MAX_FEATURES = 4000


@dataclass
class Features:
    xy: np.ndarray  # (n, 2) float64, GDAL pixel coordinates
    desc: np.ndarray  # (n, 128) float32, RootSIFT (unit L2 norm)
    shape: tuple[int, int]  # (rows, cols) of the image they come from
    scores: np.ndarray | None = None  # (n,) detection scores (learned extractors), strongest first

    def __len__(self) -> int:
        return len(self.xy)


_SIFT: dict[int, cv2.SIFT] = {}
_CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


def _sift(n: int) -> cv2.SIFT:
    if n not in _SIFT:
        _SIFT[n] = cv2.SIFT_create(nfeatures=n, contrastThreshold=0.02)
    return _SIFT[n]


def gray(rgb: np.ndarray) -> np.ndarray:
    """Luminance with local contrast equalised: photos through the atmosphere and cloudless satellite
    mosaics differ more in contrast than in structure."""
    return _CLAHE.apply(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def detect(rgb: np.ndarray, valid: np.ndarray | None = None, max_features: int = MAX_FEATURES) -> Features:
    """RootSIFT keypoints of an RGB image; ``valid`` (bool) masks out nodata (eroded: no edge features)."""
    mask = None
    if valid is not None and not valid.all():
        mask = cv2.erode(valid.astype(np.uint8) * 255, np.ones((7, 7), np.uint8))
    kps, desc = _sift(max_features).detectAndCompute(gray(rgb), mask)
    if desc is None or not kps:
        return Features(np.zeros((0, 2)), np.zeros((0, 128), np.float32), rgb.shape[:2])
    desc = desc.astype(np.float32)
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)  # RootSIFT: L1 normalise, then sqrt
    desc = np.sqrt(desc)
    xy = np.array([kp.pt for kp in kps], dtype=np.float64) + 0.5
    return Features(xy, desc, rgb.shape[:2])


def _ratio_pairs(knn: list, ratio: float) -> dict[int, int]:
    out = {}
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance or len(pair) == 1:
            out[pair[0].queryIdx] = pair[0].trainIdx
    return out


def match(
    a: Features, b: Features, ratio: float = 0.85, mutual: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indexes (ia, ib) of putative matches: Lowe's ratio test, and optionally kept only if mutual."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    bf = cv2.BFMatcher(cv2.NORM_L2)
    ab = _ratio_pairs(bf.knnMatch(a.desc, b.desc, k=2), ratio)
    if mutual:
        ba = {m[0].queryIdx: m[0].trainIdx for m in bf.knnMatch(b.desc, a.desc, k=1) if m}
        ab = {i: j for i, j in ab.items() if ba.get(j) == i}
    ia = np.fromiter(ab.keys(), int, len(ab))
    ib = np.fromiter(ab.values(), int, len(ab))
    return ia, ib


def match_guided(
    a: Features, b: Features, predicted: np.ndarray, radius: float, ratio: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """Matches of ``a`` among the keypoints of ``b`` within ``radius`` px of where ``a``'s should land.

    ``predicted`` (n_a, 2) is each keypoint of ``a`` mapped into ``b``'s frame by the current estimate.
    The ratio test runs among the nearby candidates only: a repeated pattern 200 px away no longer makes a
    true match ambiguous, which is what lets the iteration gather many more inliers on the right place.
    """
    if len(a) < 2 or len(b) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    d2 = ((predicted[:, None, :] - b.xy[None, :, :]) ** 2).sum(-1)
    near = d2 <= radius * radius
    if not near.any():
        return np.zeros(0, int), np.zeros(0, int)
    rows = np.flatnonzero(near.any(1))
    bf = cv2.BFMatcher(cv2.NORM_L2)
    knn = bf.knnMatch(a.desc[rows], b.desc, k=2, mask=near[rows].astype(np.uint8))
    pairs = _ratio_pairs(knn, ratio)
    # mutual within the same gate: b's keypoint must not prefer another nearby keypoint of a
    cols = np.array(sorted(set(pairs.values())), dtype=int)
    if cols.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    back = bf.knnMatch(b.desc[cols], a.desc[rows], k=1, mask=near[rows][:, cols].T.astype(np.uint8))
    best_back = {int(cols[m[0].queryIdx]): int(rows[m[0].trainIdx]) for m in back if m}
    ia, ib = [], []
    for qi, tj in pairs.items():
        i = int(rows[qi])
        if best_back.get(tj) == i:
            ia.append(i)
            ib.append(tj)
    return np.array(ia, int), np.array(ib, int)


def fit_homography(
    src: np.ndarray, dst: np.ndarray, threshold: float, confidence: float = 0.9999, max_iters: int = 20000
) -> tuple[np.ndarray | None, np.ndarray]:
    """USAC MAGSAC++ homography src -> dst (GDAL pixel coordinates) and the inlier mask (bool)."""
    n = len(src)
    if n < 4:
        return None, np.zeros(n, bool)
    h, mask = cv2.findHomography(
        (src - 0.5).astype(np.float32),
        (dst - 0.5).astype(np.float32),
        cv2.USAC_MAGSAC,
        threshold,
        confidence=confidence,
        maxIters=max_iters,
    )
    if h is None or mask is None or not np.all(np.isfinite(h)):
        return None, np.zeros(n, bool)
    # back from OpenCV's centre-on-integer frame to GDAL's
    h = (
        np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        @ h
        @ np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    )
    return h / h[2, 2], mask.ravel().astype(bool)
