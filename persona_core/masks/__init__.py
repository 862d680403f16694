"""Masks: methods, selection, the bit-packed codec, budgeted search and export."""
