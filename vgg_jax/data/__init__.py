"""Input pipeline: sources, decoding, per-image transforms and the grain datasets on them."""
