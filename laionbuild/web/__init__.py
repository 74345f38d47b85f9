"""The download on the web: URL policy, politeness, failure reasons, the local server, and
the torch-free worker processes."""
