"""Encode an index's tiles on a Ray cluster: ``skyloc index ... --ray [ADDRESS]``.

The driver (the process that runs ``skyloc index``) keeps everything a local build does: the tile list,
the staging folder, the resume marker, the FAISS index, the tile table and the manifest
(engine/retrieval/index_store.py). Only the encode loop moves: :class:`RayCluster` hands ``build_index`` an
``encode_with`` that splits the tile list into the same chunks as the local loop (``CHUNK_TILES`` tiles,
named by :func:`index_store.chunk_file`) and has Ray actors encode them:

- each worker is an actor that builds the encoder once (:class:`EncoderRecipe`; ONNX Runtime or torch on
  the CPU with as many intra-op threads as the CPUs it reserved, 1 by default; torch on the GPU when the
  cluster has GPUs, one GPU per worker) and receives the tile sources once (they pickle without their
  GDAL handles);
- the driver sends chunks (tile specs, no pixels), gets descriptors back through the object store and
  writes each chunk atomically into the staging folder, so an interrupted build resumes from the chunks
  already written, whichever way (local or Ray) it is run again: the fingerprint, the chunk layout and
  the manifest are the same;
- a worker that dies (killed, out of memory, its node lost) is replaced and its chunk re-run, up to
  MAX_ATTEMPTS times per chunk; an error of the input (a tile that cannot be read) stops the build;
- progress is reported per chunk finished on any worker; cancel kills the workers at once (a chunk being
  encoded is lost, never half-written) and raises CancelledError, leaving the staging folder to resume;
- before a build starts (nothing written yet) every node that runs a worker checks that it sees the
  sources' files at the same paths with the same sizes; the chunks check their own files again. Paths
  that exist only on the driver are reported with the node that lacks them.

Ray is an optional extra (``pip install 'skyloc[ray]'``): it is imported here only, and only when a build
asks for it. Without ``--ray`` nothing of this module runs.

Torch and ONNX Runtime use every core of the machine by default. Two workers on one 2-core machine would
then run 4 busy threads on 2 cores: each worker's thread pool spins and waits for the other's, and the
intra-op parallelism of one small-image network (per-layer synchronisation) scales worse than independent
processes over independent chunks. So a worker uses as many threads as the CPUs it reserves from Ray
(``cpus_per_worker``, 1 by default), and Ray places as many workers on a node as it has CPUs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..errors import CancelledError, InputError, SkylocError
from ..imagery.base import TileSource, TileSpec
from ..nets.base import ImageEncoder
from ..progress import CancelToken, ProgressFn, no_progress
from .chunked import ChunkedVectors
from .index_store import ROTATIONS, chunk_file, encode_tiles, tiles_per_call

log = logging.getLogger(__name__)

#: How often a chunk is tried when its worker dies before the build gives up.
MAX_ATTEMPTS = 3
#: Seconds to wait for the workers to start (encoder loaded, sources checked) before giving up.
START_TIMEOUT_S = 300.0
#: Seconds to wait for a TCP connection to a cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
#: Chunks queued per worker: the next one is already there when a worker finishes one.
QUEUED_PER_WORKER = 2
WORKER_PREFIX = "skyloc-encode"
INSTALL_HINT = "pip install 'skyloc[ray]' (or pip install -e '.[ray]' in a checkout; `make venv` does it)"

_ONE_BUILD = threading.Lock()  # one Ray connection per process: Ray builds of one process run one at a time


class ClusterError(InputError):
    """--ray: Ray is missing, the cluster cannot be reached, or its workers cannot do the work."""

    code = "ray_cluster"


def import_ray() -> Any:
    """The ``ray`` module, or a ClusterError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            f"--ray needs Ray, which is not installed in this Python ({exc.name or 'ray'} not found): "
            f"{INSTALL_HINT}; or build without --ray"
        ) from None
    return ray


# ------------------------------------------------------------------------------------------ the encoder


@dataclass(frozen=True)
class EncoderRecipe:
    """How a worker builds the driver's encoder: the arguments of ``load_encoder`` (picklable)."""

    model: str = "default"
    weights: str | None = None
    backend: str = "onnx"
    input_size: int | None = None
    sha256: str | None = None

    @classmethod
    def for_workers(
        cls,
        model: str,
        weights: str | os.PathLike | None,
        backend: str,
        input_size: int | None,
        sha256: str | None,
    ) -> EncoderRecipe:
        """The recipe with absolute paths (a weights file, a model folder): workers have other cwds."""
        from ..nets.registry import names_a_path

        model = os.path.abspath(model) if names_a_path(model) else model
        weights = os.path.abspath(weights) if weights else None
        return cls(model, weights, backend, input_size, sha256)

    def build(self, threads: int, device: str = "cpu") -> ImageEncoder:
        """The encoder on ``device`` ("cpu" or "cuda"), ``threads`` intra-op threads on the CPU.

        On a GPU the network runs in torch whatever the backend (the onnxruntime wheel here is CPU-only);
        both backends give the same descriptors within float tolerance, and the backend is not part of
        the model id. TF32 is switched off so that GPU descriptors stay within float32 tolerance of CPU ones.
        """
        import torch

        from ..nets.onnx_backend import to_onnx
        from ..nets.registry import load_encoder

        torch.set_num_threads(max(1, threads))
        torch_enc = load_encoder(
            self.model, weights=self.weights, backend="torch", input_size=self.input_size, sha256=self.sha256
        )
        max_batch = getattr(torch_enc, "max_batch", 64)
        if device != "cpu":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            enc: Any = torch_enc.to(device, preprocess_threads=threads)  # the CPUs the worker reserved
        elif self.backend == "onnx":
            enc = to_onnx(torch_enc, threads=max(1, threads))
        else:
            enc = torch_enc
        enc.max_batch = max_batch
        return enc


# ------------------------------------------------------------------------------------------- the worker


class SourcesNotOnWorker(InputError):
    """The worker's node does not see a source file as the driver does (missing, or another size)."""

    code = "ray_sources"


def file_problems(files: dict[str, int]) -> list[str]:
    """What differs between the driver's ``{path: size}`` and this machine's files (empty: all there)."""
    problems = []
    for path, size in files.items():
        try:
            here = os.stat(path).st_size
        except OSError as exc:
            problems.append(f"{path} ({exc.strerror or 'unreadable'})")
            continue
        if here != size:
            problems.append(f"{path} ({here} bytes here, {size} on the driver)")
    return problems


class ShardWorker:
    """A Ray actor that encodes chunks of tiles. Never raises in ``__init__``: errors come back by
    :meth:`info`, so that the driver reports the cause (a weights file missing on that node ...)."""

    def __init__(
        self, recipe: EncoderRecipe, sources: list[TileSource], threads: int, gpu: bool, model_id: str
    ):
        self.sources = sources
        self.error: BaseException | None = None
        self.device = "cpu"
        self.threads = threads
        self.host = socket.gethostname()
        try:
            import ray

            self.node = ray.util.get_node_ip_address()
        except Exception:  # the address is only for messages
            self.node = self.host
        try:
            if gpu:
                import torch

                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.encoder = recipe.build(threads, self.device)
            if self.encoder.model_id != model_id:
                raise ClusterError(
                    f"it builds model {self.encoder.model_id}, the driver {model_id}: install the same "
                    "weights and skyloc on every node"
                )
        except SkylocError as exc:  # reported by info(), with the node that met it
            self.error = type(exc)(f"on the Ray worker on {self.where()}: {exc.message}")
        except BaseException as exc:
            self.error = exc

    def where(self) -> str:
        return f"node {self.node} ({self.host}, pid {os.getpid()})"

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {
            "node": self.node,
            "host": self.host,
            "pid": os.getpid(),
            "device": self.device,
            "backend": self.encoder.backend,
            "threads": self.threads,
            "skyloc": __version__,
        }

    def check_files(self, files: dict[str, int]) -> list[str]:
        return file_problems(files)

    def encode_shard(
        self, items: list[tuple[int, TileSpec]], batch_tiles: int, files: dict[str, int]
    ) -> np.ndarray:
        """Descriptors ``(len(items) * 4, dim)`` float32 of (source number, spec) pairs, in their order."""
        if self.error is not None:
            raise self.error
        problems = file_problems(files)
        if problems:
            raise SourcesNotOnWorker(_not_on_worker(self.where(), problems))
        pairs = [(self.sources[i], spec) for i, spec in items]
        if self.device != "cpu":  # the driver sized the calls for its CPU; this worker's GPU takes more
            batch_tiles = max(batch_tiles, tiles_per_call(self.encoder))
        vecs = [
            encode_tiles(pairs[b : b + batch_tiles], self.encoder) for b in range(0, len(pairs), batch_tiles)
        ]
        return np.concatenate(vecs).astype(np.float32)


def _not_on_worker(where: str, problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return (
        f"the Ray worker on {where} cannot read the sources as the driver does: {shown}. Workers read the "
        "imagery themselves: put it on storage that every node mounts at the same path (or copy it to the "
        "same path on every node), or build without --ray"
    )


# ------------------------------------------------------------------------------------------ the driver


def _probe(address: str) -> None:
    """Fail fast on a ``host:port`` nobody answers on (Ray itself retries for minutes, then exits)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--ray {address!r}: not a cluster address; give HOST:PORT of the head node (its GCS port, "
            "6379 by default, as `ray start --head` prints it), 'auto' for a cluster started on this "
            "machine, or 'local' to start one here"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(
            f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            f"`ray start --head` on the head node and give its address, or use --ray local"
        ) from None


def resolve_address(address: str | bool | None) -> str:
    """The address to give ``ray.init``: never one that makes it retry for minutes and exit.

    True/None (``--ray`` alone): RAY_ADDRESS, else the cluster last started on this machine if it answers,
    else "local" (a new instance). "auto": the same but a ClusterError instead of a new instance. A stale
    ``ray_current_cluster`` file (a cluster that was stopped) is skipped: Ray itself would hang on it.
    "HOST:PORT": checked to answer. "local" and "ray://..." are passed on as they are.
    """
    if address is not True and address is not None and not isinstance(address, str):
        raise InputError(f"--ray: expected an address or nothing, got {address!r}")
    if isinstance(address, str) and address.strip() not in ("", "auto"):
        address = address.strip()
        if address != "local" and not address.startswith("ray://"):
            _probe(address)
        return address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return resolve_address(env)
    current = _last_cluster_here()
    if current is not None:
        try:
            _probe(current)
            return current
        except ClusterError:
            pass  # stopped since: not a cluster to use
    if address == "auto" or env == "auto":
        raise ClusterError(
            "--ray auto: no running Ray cluster on this machine (RAY_ADDRESS is not set and no cluster "
            "started with `ray start --head` answers); start one, give its HOST:PORT, or use --ray local"
        )
    return "local"


def _last_cluster_here() -> str | None:
    """The address in Ray's ``ray_current_cluster`` file (written by ``ray start``), if any."""
    root = os.environ.get("RAY_TMPDIR") or "/tmp"
    with contextlib.suppress(OSError):
        text = (Path(root) / "ray" / "ray_current_cluster").read_text().strip()
        return text or None
    return None


class RayCluster:
    """A connection to a Ray cluster and a pool of encoding workers, for one index build.

    ``address``, as ``--ray`` takes it (passed on to ``ray.init``): True = Ray's default (the
    cluster in RAY_ADDRESS, else one started on this machine with ``ray start``, else a new local one);
    "local" = a new local instance; "auto" = a running cluster (error if none); "HOST:PORT" = the head
    node's GCS address; "ray://HOST:PORT" = Ray Client (needs ``ray[client]``). A process already connected
    (``ray.init`` called before, as tests do) keeps its connection and ``address`` is not used.

    Use as a context manager: connecting happens on enter (nothing is written), :meth:`start` starts the
    workers and checks the sources, :meth:`encode_all` is ``build_index``'s ``encode_with``; exit kills
    the workers and disconnects if this object connected.
    """

    def __init__(
        self,
        address: str | bool = True,
        *,
        workers: int | None = None,
        cpus_per_worker: int = 1,
        progress: ProgressFn = no_progress,
        cancel: CancelToken | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if workers is not None and workers < 1:
            raise InputError(f"--ray-workers must be >= 1, got {workers}")
        if cpus_per_worker < 1:
            raise InputError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
        self.address = address
        self.workers_wanted = workers
        self.cpus_per_worker = cpus_per_worker
        self.progress = progress
        self.cancel = cancel
        self.init_kwargs = init_kwargs or {}
        self.ray: Any = None
        self.owns_connection = False
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.prefix = f"{WORKER_PREFIX}-{uuid.uuid4().hex[:8]}"
        self._serial = 0
        self._locked = False
        self._worker_args: tuple[Any, ...] = ()
        self._files: dict[str, int] = {}
        self._source_numbers: dict[int, int] = {}
        self._gpu = False
        self._worker_cpus = cpus_per_worker
        self._actor_class: Any = None

    # -- connection ---------------------------------------------------------------------------------
    def __enter__(self) -> RayCluster:
        ray = import_ray()
        if not _ONE_BUILD.acquire(timeout=0.1):
            self.progress(0.0, "waiting for another Ray build of this process to finish")
            _ONE_BUILD.acquire()
        self._locked = True
        try:
            self._connect(ray)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, ray: Any) -> None:
        self.ray = ray
        if ray.is_initialized():
            return
        address = resolve_address(self.address)
        self.progress(0.0, f"connecting to Ray ({'a new local instance' if address == 'local' else address})")
        kwargs = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
            **self.init_kwargs,
        }
        if address != "local":
            _use_token_if_any()
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError, SystemExit) as exc:
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise ClusterError(
                f"--ray{' ' + address if address else ''}: cannot use this Ray cluster: {exc}"
            ) from None
        self.owns_connection = True

    def close(self) -> None:
        """Kill this build's workers; disconnect when this object connected. Idempotent."""
        if self.ray is not None:
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    self.ray.kill(actor, no_restart=True)
            self.actors = []
            if self.owns_connection:
                with contextlib.suppress(Exception):
                    self.ray.shutdown()
                self.owns_connection = False
        if self._locked:
            self._locked = False
            _ONE_BUILD.release()

    # -- workers ------------------------------------------------------------------------------------
    def start(self, recipe: EncoderRecipe, sources: Sequence[TileSource], encoder: ImageEncoder) -> None:
        """Start the workers (each loads the encoder), check that each node sees the sources' files.

        ``sources`` must be the opened sources ``build_index`` gets (their tile lists are computed here,
        once; the workers receive the sources with them). Raises ClusterError / SourcesNotOnWorker before
        anything is written.
        """
        ray = self.ray
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        self._gpu = gpus > 0
        capacity = gpus if self._gpu else max(1, cpus // self.cpus_per_worker)
        # a GPU worker preprocesses (resize, front end) on its CPUs: one thread takes ~7 ms an image where
        # the network takes 0.3-2.4 ms (bench/results/encode_cost_h200.txt), so it reserves its share of them
        self._worker_cpus = max(self.cpus_per_worker, cpus // gpus) if self._gpu else self.cpus_per_worker
        n = self.workers_wanted or capacity
        if n > capacity:
            self.progress(
                0.0,
                f"--ray-workers {n} but the cluster has {cpus} CPUs and {gpus} GPUs now: "
                "the others start when it grows",
            )
        specs = [(src, spec) for src in sources for spec in src.specs()]
        self._files = _file_sizes(spec.source for _, spec in specs)
        self._source_numbers = {id(src): i for i, src in enumerate(sources)}
        try:
            sources_ref = ray.put(list(sources))
        except Exception as exc:  # a source that cannot be pickled (an open connection ...)
            raise ClusterError(f"the tile sources cannot be sent to Ray workers: {exc}") from None
        self._worker_args = (recipe, sources_ref, self._worker_cpus, self._gpu, encoder.model_id)
        self.progress(
            0.0,
            f"starting {n} Ray worker(s) ({'1 GPU + ' if self._gpu else ''}{self._worker_cpus} CPU each; "
            f"cluster: {cpus} CPUs, {gpus} GPUs)",
        )
        self.actors = [self._new_actor() for _ in range(n)]
        self.infos = self._wait_ready(self.actors)
        others = sorted({i["skyloc"] for i in self.infos} - {__version__})
        if others:
            raise ClusterError(
                f"the Ray workers run skyloc {', '.join(others)}, this driver {__version__}: install the same "
                "version on every node"
            )
        # every node that runs a worker sees the files at the driver's paths, with the driver's sizes
        by_node: dict[str, Any] = {}
        for actor, info in zip(self.actors, self.infos, strict=True):
            by_node.setdefault(info["node"], (actor, info))
        checks = {node: actor.check_files.remote(self._files) for node, (actor, _) in by_node.items()}
        for node, ref in checks.items():
            problems = self._get(ref)
            if problems:
                info = by_node[node][1]
                where = f"node {node} ({info['host']}, pid {info['pid']})"
                raise SourcesNotOnWorker(_not_on_worker(where, problems))
        devices = collections.Counter(
            f"{i['device']} ({i['backend']}, {i['threads']} thread{'s' if i['threads'] > 1 else ''})"
            for i in self.infos
        )
        self.progress(
            0.0,
            f"{len(self.actors)} Ray worker(s) ready on {len(by_node)} node(s): "
            + ", ".join(f"{c} {d}" for d, c in sorted(devices.items())),
        )

    def _new_actor(self) -> Any:
        ray = self.ray
        self._serial += 1
        if self._actor_class is None:
            self._actor_class = ray.remote(ShardWorker)
        cls = self._actor_class.options(
            num_cpus=self._worker_cpus,
            num_gpus=1 if self._gpu else 0,
            max_restarts=0,
            name=f"{self.prefix}-{self._serial}",
        )
        return cls.remote(*self._worker_args)

    def _wait_ready(self, actors: list[Any]) -> list[dict[str, Any]]:
        """Each actor's info (raises what an actor met while loading its encoder)."""
        refs = [a.info.remote() for a in actors]
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(refs)
        while pending:
            self._check_cancel()
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{len(pending)} of {len(actors)} Ray workers did not start within {START_TIMEOUT_S:.0f} s "
                    "(not enough free CPUs/GPUs in the cluster? give --ray-workers)"
                )
        return [self._get(r) for r in refs]

    def _get(self, ref: Any) -> Any:
        """``ray.get`` that re-raises the worker's own Skyloc error (InputError ...) as it was raised."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SkylocError):
                raise cause from None
            raise

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            self._kill_all()
            raise CancelledError("cancelled by the user (the Ray workers were stopped)")

    def _kill_all(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []

    # -- the encode loop (build_index's encode_with) --------------------------------------------------
    def encode_all(
        self,
        specs: list[tuple[TileSource, TileSpec]],
        encoder: ImageEncoder,
        chunk_dir: Path,
        batch_tiles: int,
        chunk_tiles: int,
        progress: ProgressFn,
        cancel: CancelToken | None,
    ) -> ChunkedVectors:
        """Descriptors ``(n_tiles * 4, dim)`` tile-major, as the local loop: chunks encoded by the workers,
        written here atomically, those already written (an interrupted build) read back."""
        if not self.actors:
            raise RuntimeError("RayCluster.start() must run before encode_all()")
        ray = self.ray
        self.cancel = cancel if cancel is not None else self.cancel
        n = len(specs)
        paths: list[Path] = []
        todo: collections.deque[tuple[int, int]] = collections.deque()
        done_tiles = 0
        for start in range(0, n, chunk_tiles):
            stop = min(start + chunk_tiles, n)
            path = chunk_file(chunk_dir, start, stop)
            paths.append(path)
            if path.exists():
                done_tiles += stop - start
                progress(0.9 * stop / n, f"resumed tiles {start}-{stop} of {n}")
            else:
                todo.append((start, stop))
        attempts: collections.Counter[int] = collections.Counter()
        in_flight: dict[Any, tuple[Any, tuple[int, int]]] = {}
        load = {id(a): 0 for a in self.actors}

        def submit(actor: Any, shard: tuple[int, int]) -> None:
            in_flight[self.encode_on(actor, specs[shard[0] : shard[1]], batch_tiles)] = (actor, shard)
            load[id(actor)] += 1

        try:
            while todo or in_flight:
                self._check_cancel()
                for actor in list(self.actors):
                    while todo and load[id(actor)] < QUEUED_PER_WORKER:
                        submit(actor, todo.popleft())
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
                for ref in ready:
                    actor, (start, stop) = in_flight.pop(ref)
                    load[id(actor)] = max(0, load.get(id(actor), 1) - 1)
                    try:
                        arr = self._get(ref)
                    except _worker_lost(ray) as exc:
                        attempts[start] += 1
                        if attempts[start] >= MAX_ATTEMPTS:
                            raise ClusterError(
                                f"Ray workers died {attempts[start]} times encoding tiles {start}-{stop}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            ) from None
                        todo.appendleft((start, stop))
                        self._replace(actor, load)
                        progress(
                            0.9 * done_tiles / n,
                            f"a Ray worker died: tiles {start}-{stop} are encoded again (attempt "
                            f"{attempts[start] + 1} of {MAX_ATTEMPTS})",
                        )
                        continue
                    arr = np.array(arr, dtype=np.float32)  # own the memory (the object store's is read-only)
                    if arr.shape != ((stop - start) * len(ROTATIONS), encoder.dim):
                        raise ClusterError(
                            f"a Ray worker returned {arr.shape} descriptors for tiles {start}-{stop}, expected "
                            f"{((stop - start) * len(ROTATIONS), encoder.dim)}"
                        )
                    with atomic_path(chunk_file(chunk_dir, start, stop), suffix=".npy") as tmp:
                        np.save(tmp, arr)
                    del arr
                    done_tiles += stop - start
                    progress(
                        0.9 * done_tiles / n,
                        f"encoded {done_tiles} of {n} tiles x {len(ROTATIONS)} rotations "
                        f"({len(self.actors)} Ray workers)",
                    )
        except BaseException:
            self._kill_all()  # nothing keeps encoding for a build that stopped
            raise
        return ChunkedVectors(paths)  # read from the chunk files: the driver never holds them all

    def encode_on(self, actor: Any, specs: list[tuple[TileSource, TileSpec]], batch_tiles: int) -> Any:
        """Send ``specs`` (of the sources given to :meth:`start`) to one worker: the ObjectRef of their
        descriptors ``(len(specs) * 4, dim)``. ``encode_all`` sends every chunk through it; a benchmark
        can drive chosen workers with it."""
        items = [(self._source_numbers[id(src)], spec) for src, spec in specs]
        files = {s.source: self._files[s.source] for _, s in specs if s.source in self._files}
        return actor.encode_shard.remote(items, batch_tiles, files)

    def _replace(self, dead: Any, load: dict[int, int]) -> None:
        """Swap a dead worker for a new one (it loads the encoder again); its queued chunks come back."""
        if dead not in self.actors:  # its other queued chunk failed too: replaced already
            return
        with contextlib.suppress(Exception):
            self.ray.kill(dead, no_restart=True)
        self.actors.remove(dead)
        load.pop(id(dead), None)
        fresh = self._new_actor()
        self.actors.append(fresh)
        load[id(fresh)] = 0


def _use_token_if_any() -> None:
    """Send this machine's Ray token when connecting to a running cluster.

    Ray 2.60 clusters started with ``ray start`` require a token (``~/.ray/auth_token``, or RAY_AUTH_TOKEN),
    but a driver that connects sends it only with RAY_AUTH_MODE=token in its environment: without it the
    connection is refused ("Authentication token is missing") after half a minute of retries. This enables
    token mode, as Ray does for the clusters it starts itself, when the mode is not set and a token exists.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: the user sets RAY_AUTH_MODE as Ray's docs say
        return
    with contextlib.suppress(Exception):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _worker_lost(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's errors that mean "the worker (or its node) is gone", not "the work is wrong": re-run it."""
    names = (
        "RayActorError",  # ActorDiedError, ActorUnavailableError
        "WorkerCrashedError",
        "ObjectLostError",
        "OutOfMemoryError",
        "NodeDiedError",
    )
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _file_sizes(paths: Any) -> dict[str, int]:
    """``{path: size}`` of the distinct files tiles are read from, as the driver sees them."""
    out: dict[str, int] = {}
    for p in paths:
        p = str(p)
        if p in out:
            continue
        with contextlib.suppress(OSError):
            if os.path.isfile(p):
                out[p] = os.path.getsize(p)
    return out
