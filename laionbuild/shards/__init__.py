"""Shards: where the webdataset shards live (any fsspec URL) and reading images back by key."""
