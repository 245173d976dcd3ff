"""Retrieval: the index folder (manifest, tile table, FAISS file), the FAISS wrapper, search areas and the
kNN over rotations that turns a photo descriptor into ranked tiles."""
