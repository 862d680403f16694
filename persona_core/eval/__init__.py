"""Evaluation: the scoring engine, its conditions and baselines, metrics and validation."""
