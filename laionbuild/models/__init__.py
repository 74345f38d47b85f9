"""Models: CLIP loading (open_clip via clip-retrieval), score heads, face detectors."""
