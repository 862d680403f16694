"""Evaluation: scoring a persona's subnetwork against the baselines, under a set of conditions.

Lowest first (each module imports only modules listed before it):

* `scorer`: `Scorer`, the protocol metrics and validation are written against (the role of
  lm-evaluation-harness's `LM`: log-likelihoods of continuations, greedy generation, the chat format).
* `estimates`: seeded subsets, mean +- stderr, pairwise AUC.
* `judge`: the optional LLM judge (`JudgeSettings`, endpoint or local model).
* `validation`: the data settings are chosen on (validation statements, general-text windows), and
  `text_key`, how held-out texts are compared.
* `objective`: the contrastive learners' objective (statement margin + general-text KL), shared by
  ``learned-contrastive`` masks and the learned steering vector.
* `fewshot`: the few-shot prompts (calibration statements as examples).
* `steering`: the steering vectors (mean-difference and learned), the hook and the search for a layer and
  coefficient.
* `metrics`: `METRICS`, the metric registry (`@metric`), and the built-in metrics.
* `conditions`: `CONDITIONS`, the condition registry (dense, +prompt, +fewshot, +steer, masked, ...).
* `config`: `EvalConfig`, whose hash keys the results.
* `masked`: `MaskedModel`, masks applied in place and restored bit-exactly.
* `schema`: the result table.
* `result_parts`: one unit's result part in the store, written with its owner and digest, verified on read.
* `dense_cache`: the dense rows' identity and their cache in the store.
* `engine`: `Evaluator`, one loaded model implementing `Scorer`.
* `scoring`: one condition's rows, under whatever state the model is in.
* `steered`: the ``dense+steer`` and ``dense+steer-learned`` conditions (a steering setting chosen per pair,
  then scored).
* `unit`: `evaluate_unit`, one (persona, mask) unit's result table.
"""
