"""Where the compressed index loses the exact top-100: the IVF lists probed, or the PQ codes' ranking.

    nice .venv/bin/python bench/index_candidates.py --report /tmp/idxscale/run/report.json --n 250000 \
        --factories "IVF512,PQ512x4fsr;IVF512,PQ1024x4fsr"

On bench/index_scale.py's synthetic 2048-d descriptors (its calibrated parameters, read from its report),
200 photo-like queries, for each candidate factory (no re-ranking: the candidates themselves):
- IVF recall@100: the share of each query's exact top-100 lying in the lists it probes (nprobe = nlist/8 ..
  nlist), whatever the codes;
- cand-R@100 for R candidates: the share of the exact top-100 among the R best by the codes. After exact
  re-ranking of R candidates (the compressed index), this *is* recall@100, and 'top1' is the share of
  queries whose exact first is among them (returned first after re-ranking).
Timings are the FAISS candidate search alone (no re-ranking), batch and single query, and are upper bounds
when the machine is shared. The database, its ground truth and the queries are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.index_scale import Synth, exact_topk  # noqa: E402
from engine.retrieval.faiss_runtime import faiss  # noqa: E402  (as the engine imports it)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--report", required=True, help="bench/index_scale.py's report.json (calibrated parameters)"
    )
    ap.add_argument("--n", type=int, default=250_000)
    ap.add_argument("--factories", default="IVF512,PQ512x4fsr;IVF512,PQ1024x4fsr")
    ap.add_argument("--reranks", default="1000,2000,4000,8000")
    ap.add_argument("--work", default="/tmp/index_candidates")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    n, d = args.n, 2048
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = dict(json.loads(Path(args.report).read_text())["params"], n_tiles=n // 4)
    gen = Synth(d, params, seed=0)
    cache, truth_path = work / f"x{n}.npy", work / f"t{n}.npy"
    if cache.exists():
        x = np.load(cache)
    else:
        x = np.concatenate([gen.vectors(a, min(n // 4, a + 16384)) for a in range(0, n // 4, 16384)])
        x = x.astype(np.float16)
        np.save(cache, x)
    q, _ = gen.queries(200, seed=1)
    if truth_path.exists():
        truth = np.load(truth_path)
    else:
        _, truth = exact_topk(x, q, 100)
        np.save(truth_path, truth)
    xf = np.asarray(x, dtype=np.float32)
    train = xf[np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)]
    for factory in args.factories.split(";"):
        idx = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        t = time.time()
        idx.train(train)
        t_train = time.time() - t
        t = time.time()
        idx.add(xf)
        t_add = time.time() - t
        ivf = faiss.extract_index_ivf(idx)
        nl = ivf.nlist
        sizes = np.array([ivf.invlists.list_size(i) for i in range(nl)])
        print(
            f"== {factory} train {t_train:.0f}s add {t_add:.0f}s lists min/median/max "
            f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}",
            flush=True,
        )
        if isinstance(idx, faiss.IndexPreTransform):
            vt = idx.chain.at(0)
            xt, qt = vt.apply(xf), vt.apply(q)
        else:
            xt, qt = xf, q
        _, lists = ivf.quantizer.search(qt, nl)
        assign = ivf.quantizer.assign(xt, 1).ravel()
        for frac in (8, 4, 2, 4 / 3, 1):
            npr = int(nl / frac)
            found = np.mean([np.isin(assign[truth[i]], lists[i, :npr]).mean() for i in range(len(q))])
            print(f"  IVF recall@100 at nprobe {npr}: {found:.4f}", flush=True)
        for npr in (nl // 2, nl):
            ivf.nprobe = npr
            for r in (int(v) for v in args.reranks.split(",")):
                t = time.time()
                _, ids = idx.search(q, r)
                batch_ms = (time.time() - t) * 1e3 / len(q)
                rec = np.mean([np.isin(truth[i], ids[i]).mean() for i in range(len(q))])
                top = np.mean([truth[i, 0] in ids[i] for i in range(len(q))])
                times = []
                for i in range(10):
                    t = time.perf_counter()
                    idx.search(q[i : i + 1], r)
                    times.append((time.perf_counter() - t) * 1e3)
                print(
                    f"  nprobe {npr:5d} R {r:5d}  cand-R@100 {rec:.4f} top1 {top:.3f}  {batch_ms:.1f} ms/q(batch) "
                    f"single {np.median(times):.1f} ms",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
