"""The dataset project and its outputs: paths (layout), atomic writes, the funnel, the DVC repo,
sweeps, and what several stages read of one another's outputs (outputs)."""
