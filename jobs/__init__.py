"""Thin Ray programs over persona_core: each is a `python -m jobs.X` entrypoint."""
