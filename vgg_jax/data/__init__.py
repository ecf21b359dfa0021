"""Input pipeline: sources, per-image transforms and the grain datasets built from them."""
