"""Masks: from weights and persona statistics to keep-masks, stored bit-packed.

* `methods`: the scoring methods (one function each) and their registry, ``METHODS``.
* `spec`: `MaskSpec` (method, parameters, sparsity, granularity, allocation, budget) and its store key.
* `select`: exactly k kept per row, ties by |W| then position; unstructured and N:M selection.
* `inputs`: `LinearWeights` (the prunable weights, detached from the model) and the statistics a build reads.
* `allocation`: per-layer sparsities (OWL, focus).
* `build`: `build_masks` / `build_pair_masks` / `iter_masks`; FFN-channel scores and masks.
* `budget`: `Budget` and the search for the strongest setting within it (on two callables).
* `budgeted_build`: those callables on a loaded model (`PairSearch`) and the budgeted masks of one unit.
* `codec`: mask files (bit-packed or delta-coded safetensors), verified reads.
* `export`: an FFN-channel-pruned model saved physically smaller.
"""
