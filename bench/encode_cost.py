"""Per-image encode cost of the retrieval encoders, as an index build pays it (the world database plan).

    .venv/bin/python bench/encode_cost.py                                # CPU: onnx and torch, all cores
    .venv/bin/python bench/encode_cost.py --device cuda --models default,astroloc-random

One ``encoder.encode()`` call on ``--batch`` tiles of 256 x 256 px (random pixels: the cost does not depend
on them), preprocessing (resize, photometric front end) included, as ``build_index`` and the Ray workers
call it. On ``cuda`` the network runs in torch on the GPU (TorchEncoder.to, as a Ray GPU worker does,
TF32 off) and preprocessing on one CPU thread; the network alone is timed too (tensor already on the GPU).
Prints ms per image (median of ``--repeat`` timed calls after 2 warm-up calls).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.nets.onnx_backend import to_onnx  # noqa: E402
from engine.nets.registry import MAX_BATCH, load_encoder, resolve_model  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(name: str, args: argparse.Namespace, rng: np.random.Generator) -> None:
    import torch

    key, _ = resolve_model(name)
    enc = load_encoder(name, backend="torch")
    batch = args.batch or MAX_BATCH.get(key, 64)
    images = rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    runs = []
    if args.device == "cuda":
        torch.set_num_threads(1)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dev = enc.to("cuda")
        x = torch.from_numpy(dev.preprocess(images)).cuda()
        net16 = copy.deepcopy(dev.net).to(torch.bfloat16)  # a copy: the float32 runs keep theirs
        x16 = x.to(torch.bfloat16)

        def net_only(net: torch.nn.Module, inp: torch.Tensor) -> None:
            with torch.inference_mode():
                net(inp)
            torch.cuda.synchronize()

        runs += [
            ("cuda torch, encode()", lambda: dev.encode(images)),
            ("cuda fp32, network only", lambda: net_only(dev.net, x)),
            ("cuda bf16, network only", lambda: net_only(net16, x16)),
        ]
    else:
        onnx = to_onnx(enc, threads=args.threads or None)
        runs += [
            ("cpu onnx, encode()", lambda: onnx.encode(images)),
            ("cpu torch, encode()", lambda: enc.encode(images)),
        ]
    for label, fn in runs:
        ms = median_ms(fn, args.repeat) / batch
        print(f"{enc.name:<34} {enc.input_size:>4} {label:<26} {batch:>5} {ms:>9.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default", help="comma-separated model names (default: default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=0, help="images per call (default: the model's max_batch)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's/ORT's own)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None
    if args.device == "cuda" and gpu is None:
        print("no CUDA device: nothing measured on a GPU")
        return 1
    print(
        f"# bench/encode_cost.py {' '.join(sys.argv[1:])}\n# {platform.node()}: {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
        + (f", GPU {gpu}" if gpu else "")
    )
    rng = np.random.default_rng(0)
    print(f"{'model':<34} {'size':>4} {'runtime':<26} {'batch':>5} {'ms/image':>9}")
    for name in args.models.split(","):
        measure(name, args, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
