"""Learned masks (Persona-Pruner): FFN-channel masks learned by a straight-through top-k over frozen weights.

* `config`: `DataConfig` (the training data's recipe) and `LearnConfig` (the learner's knobs).
* `data`: the persona's training answers from the dense model, and the general text.
* `distill`: training sequences, the dense teacher's targets, logits at scored positions, the losses.
* `gate`: the straight-through top-k and the hooks that apply a channel mask (`ChannelGate`).
* `learner`: `MaskLearner` (the loop, resumable via `LearnerState`) and `learn_persona`.
* `task`: one persona's learning as a store-backed, resumable, skippable unit (`LearnTask`, `run_task`).
"""
