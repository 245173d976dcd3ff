"""Soak run of the HTTP service on loopback: a mix of every kind of request, bounded in time and count.

Starts its own engine (``skyloc serve`` in a subprocess, as the plugin does) on a temporary copy of the
bundled sample, then ``--clients`` threads send, until ``--seconds`` have passed or ``--requests``
requests were sent (whichever comes first), a weighted mix of:

- ``GET /health`` and ``GET /jobs``;
- ``POST /uploads`` and ``DELETE /uploads/{id}`` (deleting other clients' uploads too, at the same time);
- ``POST /embed`` at random points of the two sample rasters;
- jobs: heatmaps (half of them cancelled while queued or running), small index builds (cancelled), and
  long polls on them; a full queue answers 503 ``busy``, which the mix expects.

Prints the number of requests, the answers by status (``unexpected`` counts every 5xx but 503 ``busy``,
and every failure to get an answer), p50/p95 latency per kind of request, and the server's resident
memory (RSS) and open file descriptors over time. Every request goes to 127.0.0.1 only.

    python bench/soak.py --seconds 300 --out bench/results/soak.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.client import ServiceError, SkylocClient, launch  # noqa: E402

SAMPLE = ROOT / "sample"
RASTERS = ("naip_2018.tif", "naip_2009.tif")
PHOTO = "photo_2009_oblique.jpg"
#: kind of request -> weight in the mix
MIX = {"health": 25, "jobs": 5, "upload": 15, "delete": 10, "embed": 30, "heatmap": 10, "index": 3, "poll": 2}


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return float("nan")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Soak:
    """Shared state of the run: budget, results, the uploads and jobs in flight."""

    def __init__(
        self, url: str, token_file: str, root: Path, seconds: float, requests: int, seed: int
    ) -> None:
        self.url, self.token_file, self.root = url, token_file, root
        self.deadline = time.monotonic() + seconds
        self.budget = requests
        self.lock = threading.Lock()
        self.sent = 0
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.uploads: list[str] = []
        self.jobs: list[str] = []
        self.counter = 0
        self.rng = random.Random(seed)
        self.bounds = {}
        for name in RASTERS:
            with rasterio.open(root / name) as ds:
                self.bounds[name] = ds.bounds

    def take(self) -> bool:
        """One more request, if the budget (count and time) allows."""
        with self.lock:
            if self.sent >= self.budget or time.monotonic() >= self.deadline:
                return False
            self.sent += 1
            self.counter += 1
            return True

    def record(self, kind: str, seconds: float, status: str, code: str = "") -> None:
        with self.lock:
            self.latency[kind].append(seconds * 1000)
            self.status[status if status == "200" else f"{status} {code} ({kind})"] += 1
            if status == "no answer" or (status.startswith("5") and code != "busy"):
                self.unexpected[f"{kind}: {status} {code}".strip()] += 1

    def point(self, name: str) -> list[float]:
        b = self.bounds[name]
        m = 40.0
        return [self.rng.uniform(b.left + m, b.right - m), self.rng.uniform(b.bottom + m, b.top - m)]

    # ------------------------------------------------------------------------------------------ calls

    def call(self, kind: str, c: SkylocClient, rng: random.Random) -> None:
        t0 = time.perf_counter()
        status, code = "200", ""
        try:
            self._call(kind, c, rng)
        except ServiceError as exc:
            status, code = ("no answer" if exc.status is None else str(exc.status)), exc.code
        self.record(kind, time.perf_counter() - t0, status, code)

    def _call(self, kind: str, c: SkylocClient, rng: random.Random) -> None:
        if kind == "health":
            c.health()
        elif kind == "jobs":
            c.jobs()
        elif kind == "upload":
            up = c.upload(self.root / PHOTO, name=f"p{rng.randrange(1000)}.jpg")
            with self.lock:
                self.uploads.append(up.id)
        elif kind == "delete":
            with self.lock:
                upload_id = self.uploads.pop(rng.randrange(len(self.uploads))) if self.uploads else None
            if upload_id is None:
                c.health()
            else:
                c.delete_upload(upload_id)
        elif kind == "embed":
            name = rng.choice(RASTERS)
            c.embed(name, [self.point(name) for _ in range(rng.choice((1, 1, 1, 4)))])
        elif kind == "heatmap":
            name = rng.choice(RASTERS)
            with self.lock:
                n = self.counter
            job = c.heatmap(name, f"out/heat_{n}.tif", at=self.point(name))
            with self.lock:
                self.jobs.append(job.id)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.5))
                c.cancel(job)
        elif kind == "index":
            with self.lock:
                n = self.counter
            job = c.index([rng.choice(RASTERS)], f"out/idx_{n}", tile_sizes=[128], input_size=96)
            time.sleep(rng.uniform(0.2, 1.0))
            c.cancel(job)
        elif kind == "poll":
            with self.lock:
                job_id = self.jobs.pop() if self.jobs else None  # the newest: likely still running
            if job_id is None:
                c.health()
            else:
                c.request("GET", f"/jobs/{job_id}", params={"wait": 2})

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds, weights = list(MIX), list(MIX.values())
        with SkylocClient(self.url, token_file=self.token_file, timeout=60) as c:
            while self.take():
                self.call(rng.choices(kinds, weights)[0], c, rng)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="longest run (default 300 s)")
    parser.add_argument("--requests", type=int, default=20000, help="most requests (default 20000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--sample-every", type=float, default=15.0, help="RSS sample period (default 15 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="skyloc-soak-"))
    root = work / "root"
    (root / "out").mkdir(parents=True)
    for name in (*RASTERS, PHOTO):
        shutil.copy(SAMPLE / name, root / name)
    lines = [
        f"Skyloc service soak run, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"{args.clients} concurrent clients (keep-alive sessions), at most {args.seconds:g} s and "
        f"{args.requests} requests, mix (weights): {', '.join(f'{k} {v}' for k, v in MIX.items())}",
    ]
    engine = launch(
        [sys.executable, "-m", "engine.cli", "serve"], roots=[str(root)], extra_args=["--queue", "4"]
    )
    pid = engine.process.pid
    timeline: list[str] = []
    try:
        soak = Soak(engine.url, engine.token_file, root, args.seconds, args.requests, args.seed)
        t_start = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while True:
                with soak.lock:
                    sent = soak.sent
                timeline.append(
                    f"  t={time.monotonic() - t_start:6.0f} s  requests {sent:6d}  RSS {rss_mb(pid):6.0f} MB  "
                    f"open fds {open_fds(pid)}"
                )
                if stop.wait(args.sample_every):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = [
            threading.Thread(target=soak.client_loop, args=(args.seed * 1000 + i,))
            for i in range(args.clients)
        ]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        elapsed = time.monotonic() - t_start
        stop.set()
        sampler.join()
        with SkylocClient(engine.url, token_file=engine.token_file) as c:  # let cancelled jobs settle
            for job in c.jobs():
                if not job.done:
                    c.wait(job, timeout=120, check=False)
            health = c.health()["status"]
        time.sleep(1.0)
        timeline.append(
            f"  t={time.monotonic() - t_start:6.0f} s  (jobs settled)  RSS {rss_mb(pid):6.0f} MB  "
            f"open fds {open_fds(pid)}"
        )
        everything = [v for values in soak.latency.values() for v in values]
        lines += [
            f"requests: {soak.sent} in {elapsed:.0f} s ({soak.sent / elapsed:.1f} req/s)",
            "answers by status: " + ", ".join(f"{s} x{n}" for s, n in sorted(soak.status.items())),
            f"unexpected (5xx other than 503 busy, or no answer): {sum(soak.unexpected.values())}"
            + "".join(f"\n  {k} x{n}" for k, n in soak.unexpected.most_common()),
            f"latency ms, all: p50 {pct(everything, 50):.1f}  p95 {pct(everything, 95):.1f}",
        ]
        for kind in MIX:
            values = soak.latency.get(kind, [])
            if values:
                lines.append(
                    f"  {kind:8s} n={len(values):5d}  p50 {pct(values, 50):7.1f}  p95 {pct(values, 95):7.1f}"
                )
        lines += ["server RSS and open file descriptors over time:", *timeline]
        lines.append(f"server healthy after the run: {health}")
    finally:
        rc = engine.stop()
        shutil.rmtree(work, ignore_errors=True)
    lines.append(f"engine stopped with exit code {rc}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
