"""The engine's model list says which weights file each model uses and its sha256 where it knows them
(issue 13: the plugin shows them), and None where the user gives the weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine import api


def test_models_name_the_shipped_weights_file_and_its_sha256():
    models = {(m["kind"], m["name"]): m for m in api.models()}
    for key in (
        ("retrieval", "effnet-lite1-gem"),
        ("retrieval", "effnet-lite0-gem"),
        ("embedding", "default"),
    ):
        m = models[key]
        path = Path(m["weights_file"])
        assert path.is_file() and path.suffix == ".pth"
        assert m["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the retrieval default is Lite1; the embedding default's backbone is still Lite0's feature map
    assert tuple(models["retrieval", "effnet-lite1-gem"]["aliases"]) == ("default",)
    assert models["retrieval", "effnet-lite1-gem"]["sha256"].startswith("77cc7160")
    assert models["embedding", "default"]["sha256"] == models["retrieval", "effnet-lite0-gem"]["sha256"]
    assert models["embedding", "default"]["sha256"].startswith("57934424")
    for key in (("retrieval", "astroloc"), ("embedding", "gair")):
        assert models[key]["weights_file"] is None and models[key]["sha256"] is None
