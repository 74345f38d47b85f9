"""User tools over a build: query, serve (search page), projector, the HTML report, progress."""
