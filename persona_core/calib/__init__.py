"""Calibration: the activation statistics of every prunable linear input, over a persona's texts.

* `config`: `CalibConfig` (how texts are rendered and run; its hash keys every stats part).
* `texts`: statements rendered through the chat template, generated replies, shards, batches.
* `recorder`: the forward pre-hooks and `calibrate` / `calibrate_persona`.
* `attribution`: the MLP channels' attribution to the log-likelihood (group ``mlp_attr``).
* `stats`: `GroupStats` / `PersonaStats`, sufficient statistics that merge by addition; `Shard`.
* `parts`: one stats part in the store (key, Parquet schema, write, verified read).
* `stored`: the statistics a store holds (list, read merged, stale parts, the pyarrow dataset).
"""
