"""persona_core: find and score persona subnetworks of a causal LM without training.

A plain library (torch, transformers, pyarrow, fsspec); it never imports Ray. The public API
(`persona_core.api`, docs/using-masks.md) is available from the package itself::

    from persona_core import open_store, load_model, list_masks, read_mask, apply_mask

Those names load on first use, so ``import persona_core`` alone stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# the public API, re-exported from persona_core.api (the top layer of the library)
__all__ = ["Conversation", "Mask", "MaskRef", "Store", "__version__", "apply_mask", "export_mask", "find_mask",
           "list_masks", "load_model", "measurements", "model_card", "open_store", "read_mask"]
API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("persona_core.api"), name)
    raise AttributeError(f"module 'persona_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
