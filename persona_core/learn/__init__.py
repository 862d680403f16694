"""Learned masks: a straight-through top-k over frozen weights, as resumable units."""
