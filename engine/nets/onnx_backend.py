"""Runtime backends for our image networks: torch and ONNX Runtime, sharing one preprocessing.

Every network here maps a normalised float tensor (B, 3, S, S) to L2-normalised descriptors. What
turns user images into that tensor (validation, resize, normalisation) is :class:`Preprocess`, used by
both :class:`TorchEncoder` and :class:`OnnxEncoder`, so the two backends cannot drift apart.

ONNX files are exported once per (model id, input size) and cached under ``$SKYLOC_CACHE/onnx``
(default ``~/.cache/skyloc/onnx``). The export is written beside its final name and renamed, so an
interrupted export never leaves a truncated model that a later run would trust; its sha256 is then
recorded in ``<file>.onnx.json``, and a cached file that does not match it (damaged on disk, truncated by
a full disk or another tool, or left by a build without the record) is exported again instead of failing
every run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.errors import EmptyInputError, InputError, WeightsError
from engine.nets.frontend import apply as apply_frontend
from engine.nets.frontend import untag_model_id

if TYPE_CHECKING:
    from engine.nets.checkpoints import LoadReport

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPORT_VERSION = 1  # bump when the exported graph of an existing model id changes
OPSET = 17


@dataclass(frozen=True)
class Preprocess:
    """(B, H, W, 3) uint8 RGB -> (B, 3, size, size) float32, normalised with mean/std (0-1 scale).

    Images are resized to a square without keeping the aspect ratio (as EarthLoc/AstroLoc do for their
    queries), bilinear with antialiasing when shrinking. The photometric ``frontend``
    (:mod:`engine.nets.frontend`) then runs on the resized uint8 image, before mean/std: the same numpy
    code for database tiles and photos, on both backends.
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    frontend: str = "none"
    #: Threads that share a batch (a GPU worker: its network is 10-30x faster than one CPU thread's resize
    #: and front end). The same output whatever the number: each image is processed on its own.
    threads: int = field(default=1, compare=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        if self.threads > 1 and len(images) > 1:
            parts = np.array_split(np.arange(len(images)), min(self.threads, len(images)))
            pool = _pool(self.threads)
            return np.concatenate(list(pool.map(lambda rows: self._one_thread(images[rows]), parts)))
        return self._one_thread(images)

    def _one_thread(self, images: np.ndarray) -> np.ndarray:
        resized = np.stack([self._resize(img) for img in images]) if len(images) else images
        x = apply_frontend(self.frontend, resized)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def _resize(self, img: np.ndarray) -> np.ndarray:
        if img.shape[0] == self.size and img.shape[1] == self.size:
            return img
        return np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.BILINEAR))


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per thread count for the process (PIL's resize and OpenCV release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="skyloc-preprocess")


def check_images(images: np.ndarray) -> np.ndarray:
    """Reject anything but a (B, H, W, 3) uint8 array with a clear InputError."""
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must have shape (B, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise InputError(f"images must be uint8 RGB, got dtype {images.dtype}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise EmptyInputError(f"images have no pixels: shape {images.shape}")
    return images


def _l2n(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


class TorchEncoder:
    """An ImageEncoder running a torch network in eval mode under inference_mode (batch as given)."""

    backend = "torch"

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        model_id: str,
        dim: int,
        preprocess: Preprocess,
        load_report: LoadReport | None = None,
    ):
        self.net = net.eval()
        self.load_report = load_report  # what a checkpoint load matched, when built from one
        self.name = name
        self.model_id = model_id
        self.dim = dim
        self.input_size = preprocess.size
        self.preprocess = preprocess
        self.device = "cpu"

    @property
    def frontend(self) -> str:
        """The photometric front end (part of the model id; :mod:`engine.nets.frontend`)."""
        return self.preprocess.frontend

    def to(self, device: str, preprocess_threads: int = 1) -> TorchEncoder:
        """Run the network on ``device`` ("cuda", "cuda:1"...; a Ray GPU worker). The preprocessing stays
        on the CPU in numpy, on ``preprocess_threads`` threads; the model id and the L2-normalised float32
        output are the same."""
        self.net = self.net.to(device).eval()
        self.device = device
        self.preprocess = replace(self.preprocess, threads=max(1, int(preprocess_threads)))
        return self

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = self.net(torch.from_numpy(x).to(self.device)).float().cpu().numpy()
        return _l2n(out)


class OnnxEncoder:
    """An ImageEncoder running an exported network with onnxruntime on CPU."""

    backend = "onnx"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str,
        model_id: str,
        dim: int,
        preprocess: Preprocess,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise WeightsError(f"cannot open ONNX model {path}: {exc}") from exc
        self.path = Path(path)
        self.name = name
        self.model_id = model_id
        self.dim = dim
        self.input_size = preprocess.size
        self.preprocess = preprocess
        self._input = self.session.get_inputs()[0].name

    @property
    def frontend(self) -> str:
        return self.preprocess.frontend

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = self.preprocess(images)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        (out,) = self.session.run(None, {self._input: x}, shrinking_run_options())
        return _l2n(out)


def shrinking_run_options() -> Any:
    """Run options that hand ONNX Runtime's arena back after each run.

    Without them the CPU arena keeps the peak of the largest batch for the life of the process: a
    long-running service that built one index held ~1.7 GB more for ever (bench/soak.py, issue 11 item 7).
    """
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def onnx_cache_dir() -> Path:
    """Where exported models live: ``$SKYLOC_CACHE/onnx``, else ``~/.cache/skyloc/onnx``."""
    root = os.environ.get("SKYLOC_CACHE") or os.path.join("~", ".cache", "skyloc")
    return Path(root).expanduser() / "onnx"


def onnx_path_for(net: nn.Module, model_id: str, size: int, cache_dir: Path | None = None) -> Path:
    """Cache file name: readable model id and size, plus a short hash of everything that shapes the graph.

    The hash covers the architecture's repr (variant, SALAD shape ...) and EXPORT_VERSION, so a code
    change that alters the network never reuses a stale export; the weights are named by model_id.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")
    key = f"{model_id}|{size}|{EXPORT_VERSION}|{net!r}".encode()
    return (cache_dir or onnx_cache_dir()) / f"{safe}-{size}-{hashlib.sha256(key).hexdigest()[:8]}.onnx"


def record_path(path: str | os.PathLike) -> Path:
    """The sidecar that records an export's sha256: ``<file>.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared $SKYLOC_CACHE must stay readable
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def export_onnx(net: nn.Module, size: int, path: str | os.PathLike) -> Path:
    """Export ``net`` ((B,3,size,size) -> (B,D)) to ONNX with a dynamic batch axis, atomically.

    The sha256 of the written file goes to :func:`record_path` afterwards (atomically too): a file without
    a matching record is never trusted by :func:`cached_onnx`.
    """
    from engine.nets.checkpoints import sha256_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        record_path(path).unlink()  # the old record must not vouch for the file about to be replaced
    try:
        net = net.eval()
        dummy = torch.zeros(2, 3, size, size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python ints are expected here
            torch.onnx.export(
                net,
                (dummy,),
                tmp,
                input_names=["image"],
                output_names=["descriptor"],
                dynamic_axes={"image": {0: "batch"}, "descriptor": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared $SKYLOC_CACHE must stay readable
        record = {
            "sha256": sha256_file(tmp),
            "bytes": os.path.getsize(tmp),
            "export_version": EXPORT_VERSION,
            "opset": OPSET,
        }
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _write_atomic(record_path(path), json.dumps(record).encode())
    return path


def cached_export_ok(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and is byte for byte the export its record describes."""
    from engine.nets.checkpoints import sha256_file

    path = Path(path)
    try:
        record = json.loads(record_path(path).read_text())
        return (
            isinstance(record, dict)
            and record.get("bytes") == path.stat().st_size
            and record.get("sha256") == sha256_file(path)
        )
    except (OSError, ValueError):  # no file, no record, unreadable or malformed record
        return False


def cached_onnx(net: nn.Module, size: int, path: str | os.PathLike) -> Path:
    """``path`` if it holds a verified export of ``net``, else a fresh export written there."""
    path = Path(path)
    return path if cached_export_ok(path) else _export_again(net, size, path)


def _export_again(net: nn.Module, size: int, path: Path) -> Path:
    if path.exists() and record_path(path).exists():
        log.warning("cached ONNX model %s does not match its recorded sha256: exporting it again", path)
    elif path.exists():
        log.info("cached ONNX model %s has no export record (an older cache): exporting it again", path)
    return export_onnx(net, size, path)


def to_onnx(encoder: TorchEncoder, cache_dir: Path | None = None, threads: int | None = None) -> OnnxEncoder:
    """The ONNX Runtime twin of a torch encoder (same id, size, preprocessing), exporting if not cached.

    A cached export that onnxruntime refuses although its hash matches (written by a broken build) is
    exported again once before the error is reported. The front end runs beside the graph (in
    ``preprocess``), so one export serves every front end of a network.
    """
    graph_id = untag_model_id(encoder.model_id)
    path = onnx_path_for(encoder.net, graph_id, encoder.input_size, cache_dir)
    fresh = not cached_export_ok(path)
    if fresh:
        _export_again(encoder.net, encoder.input_size, path)

    def open_session() -> OnnxEncoder:
        return OnnxEncoder(
            path,
            name=encoder.name,
            model_id=encoder.model_id,
            dim=encoder.dim,
            preprocess=encoder.preprocess,
            threads=threads,
        )

    try:
        return open_session()
    except WeightsError:
        if fresh:
            raise
        log.warning("onnxruntime cannot open the cached %s: exporting it again", path)
        export_onnx(encoder.net, encoder.input_size, path)
        return open_session()
