"""Bounded load run of the HTTP service on loopback: latency, errors and the server's memory.

Starts a real engine (``skyloc serve`` in a subprocess, as the plugin does), then

1. ``--health`` GET /health requests from ``--clients`` concurrent clients: the service's own overhead
   (token check, routing, JSON), no engine work;
2. ``--requests`` POST /embed requests (one point each, at random places of the bundled NAIP raster) from
   ``--clients`` concurrent clients: what a user clicking on the map costs.

Prints p50/p95/p99/max latency, throughput, error count, and the server's resident memory (RSS) before the
run (idle, then after a warm-up that loads the model), its peak during the run and after it: "no growth"
means the after figure stays at the warmed-up one.

    python bench/service_load.py --out bench/results/service_load.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import rasterio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.client import ServiceError, SkylocClient, launch  # noqa: E402

RASTER = ROOT / "sample" / "naip_2018.tif"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class PeakRss(threading.Thread):
    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self.stop.wait(self.every)


def run_load(url: str, token_file: str, n: int, clients: int, call) -> tuple[list[float], list[str], float]:
    """``n`` calls of ``call(client, i)`` spread over ``clients`` threads, each with its own session."""
    local = threading.local()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = SkylocClient(url, token_file=token_file, timeout=120)
        t0 = time.perf_counter()
        try:
            call(local.client, i)
        except ServiceError as exc:
            with lock:
                errors.append(f"{exc.status} {exc.code}: {exc.message[:100]}")
            return
        dt_ms = (time.perf_counter() - t0) * 1000
        with lock:
            latencies.append(dt_ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    return latencies, errors, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def describe(name: str, latencies: list[float], errors: list[str], seconds: float, n: int) -> list[str]:
    lines = [
        f"{name}: {n} requests, {len(latencies)} ok, {len(errors)} errors, {seconds:.1f} s, "
        f"{n / seconds:.1f} req/s",
        f"  latency ms: p50 {pct(latencies, 50):.1f}  p95 {pct(latencies, 95):.1f}  p99 {pct(latencies, 99):.1f}  "
        f"max {max(latencies, default=float('nan')):.1f}  mean {statistics.fmean(latencies) if latencies else float('nan'):.1f}",
    ]
    for e in sorted(set(errors))[:5]:
        lines.append(f"  error: {e} (x{errors.count(e)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="embed-at-point requests (default 500)")
    parser.add_argument("--health", type=int, default=2000, help="health requests (default 2000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--warmup", type=int, default=16, help="embed requests before measuring (default 8)")
    parser.add_argument("--model", default="default", help="embedding model (default: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)

    with rasterio.open(RASTER) as ds:
        b = ds.bounds
    rng = random.Random(args.seed)
    margin = 50.0  # metres inside the edges
    points = [
        [rng.uniform(b.left + margin, b.right - margin), rng.uniform(b.bottom + margin, b.top - margin)]
        for _ in range(args.requests + args.warmup)
    ]

    engine = launch([sys.executable, "-m", "engine.cli", "serve"], roots=[str(RASTER.parent)])
    lines = [
        f"Skyloc service load run, {dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"engine: {engine.url} (loopback, token), 1 uvicorn process, embed model {args.model!r}, "
        f"{args.clients} concurrent clients (one keep-alive session each)",
    ]
    try:
        pid = engine.process.pid
        rss_idle = rss_mb(pid)
        raster = str(RASTER)

        def embed(client: SkylocClient, i: int) -> None:
            result = client.embed(raster, [points[i]], model=args.model)
            if len(result["points"]) != 1:
                raise ServiceError(200, "bad_answer", f"{len(result['points'])} points")

        _, warm_errors, _ = run_load(engine.url, engine.token_file, args.warmup, args.clients, embed)
        if warm_errors:
            raise SystemExit(f"warm-up failed: {warm_errors[0]}")
        rss_warm = rss_mb(pid)

        health = lambda c, i: c.health()  # noqa: E731
        lat_h, err_h, sec_h = run_load(engine.url, engine.token_file, args.health, args.clients, health)
        lines += describe("GET /health (service overhead)", lat_h, err_h, sec_h, args.health)
        rss_after_health = rss_mb(pid)

        peak = PeakRss(pid)
        peak.start()
        lat_e: list[float] = []
        err_e: list[str] = []
        sec_e = 0.0
        checkpoints = []
        done = 0
        while done < args.requests:  # in 5 slices, to see whether memory settles or keeps growing
            n = min(max(1, args.requests // 5), args.requests - done)
            start = args.warmup + done
            sliced = lambda c, i, start=start: embed(c, i + start)  # noqa: E731
            lat, err, sec = run_load(engine.url, engine.token_file, n, args.clients, sliced)
            lat_e, err_e, sec_e, done = lat_e + lat, err_e + err, sec_e + sec, done + n
            checkpoints.append(f"{done}: {rss_mb(pid):.0f}")
        peak.stop.set()
        peak.join()
        rss_after = rss_mb(pid)
        lines += describe("POST /embed, 1 point each", lat_e, err_e, sec_e, args.requests)
        lines += [
            f"server RSS MB: idle {rss_idle:.0f}, after warm-up ({args.warmup} embeds, {args.clients} clients) "
            f"{rss_warm:.0f}, after health run {rss_after_health:.0f}, peak during embed run {peak.peak:.0f}, "
            f"after embed run {rss_after:.0f} (change over the run {rss_after - rss_warm:+.0f})",
            "server RSS MB after N embed requests: " + ", ".join(checkpoints),
            f"server healthy after the run: {engine.client.health()['status']}",
        ]
    finally:
        rc = engine.stop()
    lines.append(f"engine stopped with exit code {rc}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
