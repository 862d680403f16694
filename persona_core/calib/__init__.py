"""Calibration: the texts, the statistics recorder, and the stats parts in the store."""
