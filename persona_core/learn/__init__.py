"""Learned masks: a straight-through top-k over frozen weights.

* `contrastive`: ``learned-contrastive``, a pair's two masks learned for the contrast (statement margin +
  general-text KL, `persona_core.eval.objective`) along a k path under a capability budget.
* `checkpoint`: learner checkpoints verified (digest, owner, shapes, finite, step) before a resume.

Persona-Pruner's masks (FFN channels, learned from one persona description):

* `config`: `DataConfig` (the training data's recipe) and `LearnConfig` (the learner's knobs).
* `data`: the persona's training answers from the dense model, and the general text.
* `distill`: training sequences, the dense teacher's targets, logits at scored positions, the losses.
* `gate`: the straight-through top-k and the hooks that multiply module inputs by a mask (`InputGate`;
  `ChannelGate`, every layer's MLP channels; `contrastive.UnitGate`, a learned unit's segments).
* `learner`: `MaskLearner` (the loop, resumable via `LearnerState`) and `learn_persona`.
* `task`: one persona's learning as a store-backed, resumable, skippable unit (`LearnTask`, `run_task`).
"""
