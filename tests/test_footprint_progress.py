"""Progress within a photo (issue 13): a footprint job reports the candidate it tries and each refinement
pass, so a 15-s photo does not stand at one number. Real estimator, real sample photo and raster."""

from __future__ import annotations

from imagery import SAMPLE

from engine import api
from engine.footprint.coregister import CoregParams
from engine.footprint.estimate import GroundCandidate, estimate
from engine.imagery.photos import read_image
from engine.imagery.views import RasterGround

NAIP09 = SAMPLE / "naip_2009.tif"
PHOTO = SAMPLE / "photo_2009_oblique.jpg"


def test_estimate_reports_candidates_and_passes():
    seen: list[tuple[float, str]] = []
    ground = RasterGround(NAIP09)
    try:
        rgb = read_image(PHOTO)
        cands = [
            GroundCandidate("whole", ground, ground.bounds, rank=1),
            GroundCandidate("again", ground, ground.bounds, rank=2),
        ]
        fp = estimate(
            str(PHOTO), rgb, cands, CoregParams(matcher="sift"), progress=lambda f, m: seen.append((f, m))
        )
    finally:
        ground.close()
    assert fp.status == "localized", fp.reason
    messages = [m for _, m in seen]
    assert messages[:2] == ["candidate 1 of 2 (sift)", "candidate 1 of 2 (sift): first match"]
    passes = [m for m in messages if m.startswith("candidate 1 of 2 (sift): pass ")]
    assert len(passes) >= 2, messages  # the refinement's passes, one message each
    assert " verified, moved " in passes[0] and passes[0].endswith(" px")
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] <= 1.0
    assert len({round(f, 3) for f in fractions}) >= 3  # it moves during the photo


def test_footprint_job_progress_moves_within_one_photo(tmp_path):
    seen: list[tuple[float, str]] = []
    api.footprint(
        [str(PHOTO)],
        str(NAIP09),
        out=str(tmp_path / "fp.gpkg"),
        top_k=2,
        params=CoregParams(matcher="sift"),
        progress=lambda f, m: seen.append((f, m)),
    )
    within = [(f, m) for f, m in seen if m.startswith(f"photo 1 of 1: {PHOTO.name}: ")]
    assert any("finding candidate windows" in m for _, m in within), seen
    # the first photo encodes the raster's windows: the bar moves through them (issue 13: it stood still)
    encoding = [(f, m) for f, m in within if "finding candidate windows: encoded " in m]
    assert len(encoding) >= 3 and encoding[-1][1].endswith(f" windows of {NAIP09.name}"), within
    assert encoding[0][0] < encoding[-1][0] <= 0.4 + 1e-9, encoding
    n = int(encoding[-1][1].split("windows: encoded ")[1].split()[0])
    assert encoding[-1][1].endswith(f"encoded {n} of {n} windows of {NAIP09.name}") and n > 16, encoding
    assert any(": candidate 1 of 2 (sift): pass 1: " in m for _, m in within), seen
    fractions = [f for f, _ in within]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)
    assert len({round(f, 3) for f in fractions if f < 1.0}) >= 3, within
    assert seen[-1][0] == 1.0
