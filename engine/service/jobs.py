"""Long actions as jobs: a bounded queue, a few worker threads, progress, cancel, result, cleanup.

A job is queued (503 ``busy`` when ``queue_size`` jobs already wait), run by one of ``workers`` threads
with a progress callback and a :class:`~engine.progress.CancelToken`, and ends ``succeeded`` (with its
result: the files written and a JSON summary), ``failed`` (with ``{"code", "message", "http_status"}``)
or ``cancelled``. A job that does not succeed leaves nothing behind: the engine writes its final outputs
atomically, and the :class:`OutputGuard` removes what the job created on the way (an index build's
``.partial`` folder, a footprint batch's ``.parts`` records and the GeoTIFFs of the photos it finished).
Finished jobs are kept for clients to read: the most recent ``keep``, none older than ``keep_seconds``.
A finished job keeps only JSON (its result, error, parameters): the job function and everything its
closure held (opened indexes, photos' arrays, the cancel token's waiters) are released when it ends, and
freed heap pages are handed back to the system (``release_memory``), so memory does not ratchet up with
every job a client starts and cancels.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import queue
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from traceback import format_exc
from typing import Any

from ..errors import CancelledError, SkylocError, from_os_error
from ..progress import CancelToken, ProgressFn
from .errors import BusyError, ConflictError, JobNotFoundError

log = logging.getLogger("skyloc.service")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class JobOutcome:
    """What a job function returns: the files it wrote and a JSON-able summary."""

    files: list[str]
    summary: Any


#: ``run(progress, cancel) -> JobOutcome``
JobFn = Callable[[ProgressFn, CancelToken], JobOutcome]
#: Warnings kept per job (the first ones; repeats are kept once).
MAX_JOB_WARNINGS = 20


class JobWarnings(logging.Handler):
    """Warnings the engine logs (``skyloc.*``, not the service's own) while a job runs on this thread go
    into that job's ``warnings`` too (e.g. a raster whose band order is guessed), for the client to show."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.current = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(self.current, "job", None)
        if job is None or record.name.startswith("skyloc.service"):
            return
        text = record.getMessage()
        if text not in job.warnings and len(job.warnings) < MAX_JOB_WARNINGS:
            job.warnings.append(text)


JOB_WARNINGS = JobWarnings()
logging.getLogger("skyloc").addHandler(JOB_WARNINGS)


class OutputGuard:
    """Remembers which of ``paths`` did not exist before a job and removes those if the job fails."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.new = [p for p in dict.fromkeys(paths) if not (p.exists() or p.is_symlink())]

    def discard(self) -> list[str]:
        removed = []
        for p in reversed(self.new):  # children before the folders that hold them
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
                else:
                    continue
                removed.append(str(p))
            except OSError as exc:
                log.warning("could not remove partial output %s: %s", p, exc)
        return removed


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    fn: JobFn | None  # None once the job ended: its closure may hold large objects
    outputs: list[Path]
    state: str = QUEUED
    progress: float = 0.0
    message: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_token: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    discard_when_done: bool = False
    warnings: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "cancel_requested": self.cancel_token.cancelled,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "params": self.params,
            "result": self.result,
            "error": self.error,
            "warnings": list(self.warnings),
        }


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``); a no-op elsewhere.

    A job allocates and frees large buffers (tiles, feature windows, decoded photos) in worker threads;
    glibc keeps such freed memory in per-thread arenas, so without this the process's RSS stays at its
    peak after every job, cancelled ones included.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


class JobManager:
    """``workers`` threads run jobs; at most ``queue_size`` wait; finished jobs are forgotten beyond the
    last ``keep`` or after ``keep_seconds``."""

    def __init__(
        self, workers: int = 1, queue_size: int = 8, keep: int = 200, keep_seconds: float = 3600.0
    ) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError("workers >= 1 and queue_size >= 0")
        self.workers, self.queue_size, self.keep = workers, queue_size, keep
        self.keep_seconds = keep_seconds
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self._counter = itertools.count(1)
        self._threads = [
            threading.Thread(target=self._work, name=f"skyloc-job-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------------------------------ submit

    def submit(self, kind: str, fn: JobFn, *, params: dict[str, Any], outputs: Sequence[Path]) -> Job:
        with self._lock:
            if self._closed:
                raise BusyError("the service is shutting down")
            active = [j for j in self._jobs.values() if j.state in (QUEUED, RUNNING)]
            if len(active) >= self.workers + self.queue_size:
                raise BusyError(
                    f"the job queue is full ({self.queue_size} waiting, {self.workers} running): "
                    "try again later, or cancel a job"
                )
            mine = {Path(p) for p in outputs}
            for other in active:
                clash = mine & set(other.outputs)
                if clash:
                    raise ConflictError(
                        f"job {other.id} ({other.kind}, {other.state}) already writes {sorted(map(str, clash))[0]}"
                    )
            job = Job(
                id=f"{next(self._counter)}-{secrets.token_hex(4)}",
                kind=kind,
                params=params,
                fn=fn,
                outputs=list(mine),
            )
            self._jobs[job.id] = job
            self._evict()
        self._queue.put(job)
        return job

    def _evict(self) -> None:
        """Forget finished jobs beyond the last ``keep`` and those finished over ``keep_seconds`` ago.

        Caller holds the lock."""
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        old = time.time() - self.keep_seconds
        excess = max(0, len(finished) - self.keep)
        for n, job in enumerate(finished):
            if n < excess or (job.finished is not None and job.finished < old):
                del self._jobs[job.id]

    # -------------------------------------------------------------------------------------------- read

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._evict()
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            self._evict()
            return list(self._jobs.values())

    def counts(self) -> dict[str, int]:
        jobs = self.list()
        return {
            "queued": sum(j.state == QUEUED for j in jobs),
            "running": sum(j.state == RUNNING for j in jobs),
            "workers": self.workers,
            "queue_size": self.queue_size,
        }

    def wait(self, job_id: str, timeout: float) -> Job:
        job = self.get(job_id)
        if timeout > 0:
            job.done.wait(timeout)
        return job

    # ------------------------------------------------------------------------------------------ cancel

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state == QUEUED:
                job.cancel_token.cancel()
                self._finish(job, CANCELLED, "cancelled before it started")
            elif job.state == RUNNING:
                job.cancel_token.cancel()
                job.message = "cancelling: " + job.message
        return job

    def delete(self, job_id: str) -> Job:
        """Cancel the job if it is not finished, and forget it (at once, or as soon as it stops)."""
        job = self.cancel(job_id)
        with self._lock:
            if job.state in FINISHED:
                self._jobs.pop(job.id, None)
            else:
                job.discard_when_done = True
        return job

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel every queued and running one, wait up to ``timeout`` for the workers."""
        with self._lock:
            self._closed = True
            jobs = [j for j in self._jobs.values() if j.state in (QUEUED, RUNNING)]
        for job in jobs:
            with contextlib.suppress(JobNotFoundError):
                self.cancel(job.id)
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------------------ worker

    def _finish(self, job: Job, state: str, message: str) -> None:
        """Caller holds the lock."""
        job.state, job.message, job.finished = state, message, time.time()
        job.fn = None  # release what the job's closure held (indexes, arrays): only JSON stays
        if state == SUCCEEDED:
            job.progress = 1.0
        if job.discard_when_done:
            self._jobs.pop(job.id, None)
        self._evict()
        job.done.set()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state != QUEUED:  # cancelled while it waited
                    continue
                job.state, job.started, job.message = RUNNING, time.time(), "starting"
            self._run(job)

    def _run(self, job: Job) -> None:
        JOB_WARNINGS.current.job = job
        try:
            self._run_job(job)
        finally:
            JOB_WARNINGS.current.job = None
            release_memory()

    def _run_job(self, job: Job) -> None:
        def progress(fraction: float, message: str) -> None:
            if isinstance(fraction, (int, float)) and math.isfinite(fraction):
                job.progress = min(1.0, max(0.0, float(fraction)))
            job.message = ("cancelling: " if job.cancel_token.cancelled else "") + str(message)

        guard = OutputGuard(job.outputs)
        t0 = time.monotonic()
        fn, job.fn = job.fn, None
        try:
            job.cancel_token.check()
            assert fn is not None
            try:
                outcome = fn(progress, job.cancel_token)
            except OSError as exc:  # disk full, name too long ...: the user's side, not a bug
                mapped = from_os_error(exc, f"running the {job.kind} job")
                if mapped is None:
                    raise
                raise mapped from exc
            finally:
                del fn
        except CancelledError:
            removed = guard.discard()
            log.info("job %s (%s) cancelled; removed %d partial outputs", job.id, job.kind, len(removed))
            with self._lock:
                self._finish(job, CANCELLED, "cancelled; no output was left")
            return
        except SkylocError as exc:
            guard.discard()
            with self._lock:
                job.error = {"code": exc.code, "message": exc.message, "http_status": exc.http_status}
                self._finish(job, FAILED, exc.message)
            return
        except Exception:
            # the text of the traceback, not its frames: a log record kept by a handler would keep the
            # job's arrays alive through them
            log.error("job %s (%s) failed with an internal error:\n%s", job.id, job.kind, format_exc())
            guard.discard()
            with self._lock:
                job.error = {
                    "code": "internal_error",
                    "message": "internal error (a bug: the server log has the details)",
                    "http_status": 500,
                }
                self._finish(job, FAILED, job.error["message"])
            return
        with self._lock:
            job.result = {
                "files": [str(f) for f in outcome.files if f and os.path.exists(f)],
                "summary": outcome.summary,
                "seconds": round(time.monotonic() - t0, 3),
            }
            late = job.cancel_token.cancelled
            self._finish(
                job, SUCCEEDED, "done" + (" (it finished before the cancel took effect)" if late else "")
            )
