"""Neural networks: image encoders for retrieval (and later GAIR). Never a top-level ``models`` module."""
