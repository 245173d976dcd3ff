"""Two runs of bench/footprint_iss.py side by side (their --json files): per photo, status, IoU and verified
matches in each, and whether they agree. Used to check the GPU path against the CPU reference: the networks
run in other float arithmetic there (TF32 convolutions, other summation orders), so keypoints differ in the
last digits and a borderline refinement can settle on one and not on the other.

Run: python bench/footprint_compare.py A.json B.json [--key aliked@0] [--iou-tol 0.02]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: str, key: str | None) -> tuple[str, dict[str, dict]]:
    runs = json.loads(Path(path).read_text())
    k = key or next(iter(runs))
    return k, {r["photo"]: r for r in runs[k]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--key", help="matcher@turn (default: each file's first run)")
    ap.add_argument("--iou-tol", type=float, default=0.02, help="IoU difference still counted as the same")
    args = ap.parse_args()
    ka, a = rows(args.a, args.key)
    kb, b = rows(args.b, args.key)
    print(f"A = {args.a} [{ka}]\nB = {args.b} [{kb}]")
    print(
        f"{'photo':18s} {'A status':9s} {'IoU':>5s} {'ver':>4s}  {'B status':9s} {'IoU':>5s} {'ver':>4s}  same"
    )
    same = 0
    common = sorted(set(a) & set(b))
    for p in common:
        ra, rb = a[p], b[p]
        ia, ib = ra.get("iou"), rb.get("iou")
        agree = ra["status"] == rb["status"] and (ia is None or abs(ia - ib) <= args.iou_tol)
        same += agree
        fa = f"{ia:.3f}" if ia is not None else "  -  "
        fb = f"{ib:.3f}" if ib is not None else "  -  "
        print(
            f"{p:18s} {ra['status']:9s} {fa:>5s} {ra['verified']:4d}  {rb['status']:9s} {fb:>5s} "
            f"{rb['verified']:4d}  {'yes' if agree else 'NO'}"
        )
    print(f"agree on {same} of {len(common)} photos (same status, IoU within {args.iou_tol})")
    for name, r in (("A", a), ("B", b)):
        secs = sorted(x["seconds"] for x in r.values())
        if secs:
            print(f"{name}: seconds per photo, median {secs[len(secs) // 2]:.1f}, total {sum(secs):.0f}")


if __name__ == "__main__":
    main()
