"""The contract between encoders and the rest of the engine."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ImageEncoder(Protocol):
    """Turns RGB images into L2-normalised global descriptors.

    ``model_id`` names architecture *and* weights (e.g. ``effnet-lite1-gem/sha256:1a2b3c4d``): an index
    stores it and refuses queries from an encoder with another id. ``backend`` is "torch" or "onnx";
    both give the same descriptors (cosine >= 0.999), so it is not part of the id. ``frontend`` is the
    photometric front end (engine/nets/frontend.py) applied before the network: it *is* part of the id
    (``effnet-lite1-gem+gray-clahe/sha256:...``) and ``name`` is the model spec that names it.
    """

    name: str
    model_id: str
    dim: int
    input_size: int
    backend: str
    frontend: str
    max_batch: int  # images per encode() call that keep memory reasonable (indexing batches by it)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB, any H, W -> (B, dim) float32, rows L2-normalised.

        The encoder resizes to its input size and applies its own normalisation.
        """
        ...
