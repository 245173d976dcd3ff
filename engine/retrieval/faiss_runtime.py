"""FAISS, imported with its OpenMP threads told to stop spinning sooner once a parallel region ends.

libgomp (FAISS's wheel ships its own copy) keeps a thread that ran out of work spinning before it sleeps,
300,000 pause-loop turns by default: milliseconds on current CPUs. A single query's candidate scan runs on
every thread, then the exact re-rank splits its rows over the same cores (``faiss_index._exact_scores``):
FAISS's idle thread kept spinning on the core the re-rank's second thread needed. Measured (4M x 2048-d,
10,000 candidates, 2 cores, ``bench/rerank_cost.py``, session 28): scoring 15.8 ms with the default, 12.1
with 10,000 turns, 11.9 with 1000; the scan itself unchanged (29-30 ms).

libgomp reads ``GOMP_SPINCOUNT`` once, when it is loaded, so the variable is set only around the import of
FAISS and removed after it: torch's own libgomp, loaded later, and child processes keep their defaults. No
effect when FAISS was imported before this module, or when the user set ``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY`` themselves.
"""

from __future__ import annotations

import os
import sys
import threading

#: Pause-loop turns FAISS's OpenMP threads spin for more work before they sleep (libgomp: 300,000).
FAISS_OMP_SPIN_COUNT = 10_000

_LOCK = threading.Lock()


def _import_faiss():
    with _LOCK:
        if "faiss" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
            import faiss

            return faiss
        os.environ["GOMP_SPINCOUNT"] = str(FAISS_OMP_SPIN_COUNT)
        try:
            import faiss
        finally:
            os.environ.pop("GOMP_SPINCOUNT", None)
        return faiss


faiss = _import_faiss()

__all__ = ["FAISS_OMP_SPIN_COUNT", "faiss"]
