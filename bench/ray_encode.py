"""Index encoding throughput: the local build vs Ray with 1 and 2 workers on this machine, and identity.

    nice .venv/bin/python bench/ray_encode.py | tee bench/results/ray_encode.txt

The same tile list (the bundled NAIP rasters cut at ``--tile-sizes``, default model at its default input
size, ONNX Runtime) is encoded three times, each into a fresh index folder:

- ``local``: ``build_index`` as ``skyloc index`` runs it (ONNX Runtime with its default threads: every core);
- ``ray x1`` and ``ray x2``: ``build_index`` with the Ray encode loop (engine/retrieval/ray_build.py), 1 and
  2 workers of 1 CPU (1 intra-op thread) each, on a local Ray cluster started here with ``--cpus`` CPUs.

Throughput is tiles (x 4 rotations = 4 images) per second of the encode phase only: from the first chunk
sent to the last descriptor back, with the workers already started and their encoder loaded (starting
them is printed apart). The identity check compares the Ray indexes with the local one: tile table, order
and descriptors (max abs difference), manifest apart from ``created`` and ``built_at``.

The scaling ratio (issue 15: 2 workers >= 1.6x one) is then measured again in interleaved rounds on the same
two started workers (:func:`paired_rounds`): builds minutes apart time 1 and 2 workers on a machine whose
speed has drifted in between. ``--json PATH`` also writes these figures as JSON (bench/world_scale.py reads
them and judges the target on the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_times, percent, steal_share  # noqa: E402
from engine import api  # noqa: E402
from engine.imagery import open_source  # noqa: E402
from engine.retrieval import faiss_index  # noqa: E402
from engine.retrieval.index_store import (  # noqa: E402
    FAISS_FILE,
    TILES_FILE,
    _encode_all,
    build_index,
    tiles_per_call,
)
from engine.vector_io import read_layer  # noqa: E402

RASTERS = [ROOT / "sample" / "naip_2018.tif", ROOT / "sample" / "naip_2009.tif"]


def timed(encode, seconds: list[float], steal: list[float | None]):
    """An ``encode_with`` that records how long the encode phase took, and the share of the machine's CPU
    time taken by the host's other guests meanwhile (``steal``: the same work takes longer when it is high)."""

    def run(*args):
        t0, ticks = time.perf_counter(), cpu_times()
        out = encode(*args)
        seconds.append(time.perf_counter() - t0)
        steal.append(steal_share(ticks, cpu_times()))
        return out

    return run


def builds_table(builds: list[dict]) -> list[str]:
    """The lines of the builds' table, from the ``builds`` this bench writes with ``--json``."""
    lines = [f"{'build':<36} {'tiles':>6} {'encode s':>9} {'tiles/s':>8} {'ms/image':>9} {'steal':>6}"]
    for b in builds:
        lines.append(
            f"{b['build']:<36} {b['tiles']:>6} {b['encode_s']:>9.1f} {b['tiles'] / b['encode_s']:>8.2f} "
            f"{1000 * b['encode_s'] / (4 * b['tiles']):>9.1f} {percent(b.get('cpu_steal')):>6}"
        )
    return lines


def paired_rounds(cluster, specs: list, chunk: int, batch_tiles: int, rounds: int) -> list[dict]:
    """Encode ``specs`` in rounds that each time 1 worker and then 2 (the order alternates from round to
    round), on the same two started workers: each round holds 2 chunks on worker 1 alone and 2 chunks on
    each worker together.

    Why: this machine is a virtual machine whose speed drifts by a quarter within minutes (session 30: one
    encoder process ran the same 96 tiles at 1.36 and then 1.72 tiles/s, 3 minutes apart, its CPU time
    equal to its wall time). Builds one after another then time 1 and 2 workers on different machines, in
    effect; rounds of ~15 s each, interleaved, time them on the same one.
    """
    import ray

    a, b = cluster.actors[:2]
    # whole chunks only: a short one would leave a worker idle at the end of its phase
    shards = [specs[i : i + chunk] for i in range(0, len(specs) - chunk + 1, chunk)]

    def timed_phase(pairs: list) -> tuple[float, int]:
        t0 = time.perf_counter()
        ray.get([cluster.encode_on(worker, shard, batch_tiles) for worker, shard in pairs])
        return time.perf_counter() - t0, sum(len(shard) for _, shard in pairs)

    out = []
    for r in range(rounds):
        if len(shards) < 6:
            break
        phases = {"x1": [(a, s) for s in shards[:2]], "x2": list(zip((a, b, a, b), shards[2:6], strict=True))}
        shards = shards[6:]
        order = ("x1", "x2") if r % 2 == 0 else ("x2", "x1")
        ticks = cpu_times()
        took = {name: timed_phase(phases[name]) for name in order}  # seconds, tiles
        out.append(
            dict(
                order=",".join(order),
                x1_s=took["x1"][0],
                x1_tiles=took["x1"][1],
                x2_s=took["x2"][0],
                x2_tiles=took["x2"][1],
                cpu_steal=steal_share(ticks, cpu_times()),
            )
        )
    return out


def paired_summary(rounds: list[dict]) -> dict:
    """Throughputs over all rounds (tiles / seconds of each setting), their ratio, and each round's ratio."""
    x1 = sum(r["x1_tiles"] for r in rounds) / sum(r["x1_s"] for r in rounds)
    x2 = sum(r["x2_tiles"] for r in rounds) / sum(r["x2_s"] for r in rounds)
    per_round = [(r["x2_tiles"] / r["x2_s"]) / (r["x1_tiles"] / r["x1_s"]) for r in rounds]
    return dict(
        rounds=rounds, tiles_per_s=dict(ray_x1=x1, ray_x2=x2), ratio_x2_x1=x2 / x1, round_ratios=per_round
    )


def paired_lines(paired: dict) -> list[str]:
    """The paired measurement's lines, from the ``paired`` figures this bench writes with ``--json``."""
    lines = [
        f"{'round':>5} {'order':>6} {'x1 tiles':>8} {'x1 s':>6} {'x2 tiles':>8} {'x2 s':>6} {'x2/x1':>6} "
        f"{'steal':>6}"
    ]
    for i, (r, ratio) in enumerate(zip(paired["rounds"], paired["round_ratios"], strict=True), 1):
        lines.append(
            f"{i:>5} {r['order']:>6} {r['x1_tiles']:>8} {r['x1_s']:>6.1f} {r['x2_tiles']:>8} {r['x2_s']:>6.1f} "
            f"{ratio:>5.2f}x {percent(r.get('cpu_steal')):>6}"
        )
    t = paired["tiles_per_s"]
    lines.append(
        f"paired: ray x1 {t['ray_x1']:.2f} tiles/s, ray x2 {t['ray_x2']:.2f} tiles/s: ratio "
        f"{paired['ratio_x2_x1']:.2f}x (rounds {min(paired['round_ratios']):.2f}-{max(paired['round_ratios']):.2f}x)"
    )
    return lines


def open_all(tile_sizes):
    return [open_source(r, tile_sizes=tile_sizes, overlap=0.5) for r in RASTERS]


def compare(a: Path, b: Path) -> tuple[bool, str]:
    ia, ib = faiss_index.read_index(a / FAISS_FILE), faiss_index.read_index(b / FAISS_FILE)
    va, vb = ia.reconstruct_n(0, ia.ntotal), ib.reconstruct_n(0, ib.ntotal)
    _, ca = read_layer(a / TILES_FILE, "tiles")
    _, cb = read_layer(b / TILES_FILE, "tiles")
    same_tiles = all(
        list(ca[k]) == list(cb[k]) for k in ("tile_id", "source", "minx", "miny", "maxx", "maxy")
    )
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created"), m.pop("built_at")
    diff = float(np.abs(va - vb).max()) if va.shape == vb.shape else float("inf")
    ok = same_tiles and ma == mb and diff < 1e-4
    return ok, (
        f"{'IDENTICAL' if ok else 'DIFFERENT'}: tiles and order {'same' if same_tiles else 'DIFFER'}, "
        f"manifest {'same' if ma == mb else 'DIFFERS'} (but created/built_at), {va.shape[0]} vectors, "
        f"max |descriptor diff| {diff:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile-sizes", default="128,256", help="GeoTIFF tile sides (default 128,256)")
    ap.add_argument("--chunk", type=int, default=16, help="tiles per chunk (a Ray task; default 16)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="interleaved rounds of 1 and 2 workers (6 chunks each; default 4)",
    )
    ap.add_argument(
        "--paired-chunk", type=int, default=12, help="tiles per chunk of the interleaved rounds (default 12)"
    )
    ap.add_argument("--note", default="", help="a line printed at the top (e.g. 'machine shared')")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    import ray

    from engine.retrieval.ray_build import EncoderRecipe, RayCluster

    tile_sizes = tuple(int(s) for s in args.tile_sizes.split(","))
    encoder = api.get_encoder("default", None, args.backend, None, None)
    print(
        f"# bench/ray_encode.py {' '.join(argv)}\n# {platform.node()}: {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; ray {ray.__version__}; model {encoder.model_id} "
        f"({encoder.input_size} px, {args.backend}); tiles {tile_sizes} overlap 0.5 of "
        f"{', '.join(r.name for r in RASTERS)}; chunks of {args.chunk} tiles"
    )
    if args.note:
        print(f"# {args.note}")
    meta = dict(
        command=" ".join(["bench/ray_encode.py", *argv]),
        host=platform.node(),
        cpus=os.cpu_count(),
        load=os.getloadavg()[0],
        ray=ray.__version__,
        model=encoder.model_id,
        input_size=encoder.input_size,
        backend=args.backend,
        tile_sizes=list(tile_sizes),
        chunk=args.chunk,
        ray_cpus=args.cpus,
    )
    work = Path(tempfile.mkdtemp(prefix="ray_encode_"))
    builds: list[dict] = []
    try:
        srcs = open_all(tile_sizes)
        n = sum(len(s.specs()) for s in srcs)
        secs: list[float] = []
        steal: list[float | None] = []
        build_index(
            srcs, encoder, work / "local", chunk_tiles=args.chunk, encode_with=timed(_encode_all, secs, steal)
        )
        builds.append(
            dict(build="local (ONNX Runtime, all cores)", tiles=n, encode_s=secs[-1], cpu_steal=steal[-1])
        )
        print(f"local build: {n} tiles in {secs[-1]:.1f} s", flush=True)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        print(f"ray cluster on this machine: {args.cpus} CPUs, started in {time.perf_counter() - t0:.1f} s")
        recipe = EncoderRecipe.for_workers("default", None, args.backend, None, None)
        for workers in (1, 2):
            srcs = open_all(tile_sizes)
            t0 = time.perf_counter()
            with RayCluster(True, workers=workers) as cluster:
                cluster.start(recipe, srcs, encoder)
                started = time.perf_counter() - t0
                secs, steal = [], []
                build_index(
                    srcs,
                    encoder,
                    work / f"ray{workers}",
                    chunk_tiles=args.chunk,
                    encode_with=timed(cluster.encode_all, secs, steal),
                )
            builds.append(
                dict(
                    build=f"ray x{workers} (1 CPU, 1 thread each)",
                    tiles=n,
                    encode_s=secs[-1],
                    cpu_steal=steal[-1],
                )
            )
            print(
                f"ray x{workers}: workers started in {started:.1f} s; {n} tiles in {secs[-1]:.1f} s",
                flush=True,
            )
        srcs = open_all(tile_sizes)
        specs = [(src, spec) for src in srcs for spec in src.specs()]
        batch_tiles = tiles_per_call(encoder)
        with RayCluster(True, workers=2) as cluster:
            cluster.start(recipe, srcs, encoder)
            paired = paired_summary(
                paired_rounds(cluster, specs, args.paired_chunk, batch_tiles, args.rounds)
            )
        ray.shutdown()

        print("\n" + "\n".join(builds_table(builds)))
        print("steal: share of the machine's CPU time taken by the host's other guests during the encode")
        local, one, two = (b["tiles"] / b["encode_s"] for b in builds)
        print(f"\nratio ray x2 / ray x1 (the builds, one after another): {two / one:.2f}x")
        print(f"ratio ray x2 / local : {two / local:.2f}x")
        print(f"ratio ray x1 / local : {one / local:.2f}x")
        print("\n1 and 2 Ray workers timed in interleaved rounds on the same 2 workers (target >= 1.6x):")
        print("\n".join(paired_lines(paired)))
        identity = {}
        for workers in (1, 2):
            same, text = compare(work / "local", work / f"ray{workers}")
            identity[f"ray x{workers}"] = same
            print(f"identity local vs ray x{workers}: {text}")
        if args.json:
            figures = dict(
                meta,
                builds=builds,
                tiles_per_s=dict(local=local, ray_x1=one, ray_x2=two),
                ratio_x2_x1=two / one,
                ratio_x2_local=two / local,
                identical=identity,
                paired=paired,
            )
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
