"""persona_core: find and score persona subnetworks of a causal LM without training.

A plain library (torch, transformers, pyarrow, fsspec); it never imports Ray.
"""

__version__ = "0.1.0"
