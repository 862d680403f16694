"""Persona catalogs: the project's format, Anthropic's persona evals and Persona-Pruner's role-play sets."""
