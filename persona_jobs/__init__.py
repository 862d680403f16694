"""Thin Ray programs over persona_core: each is a `python -m persona_jobs.X` entrypoint."""
