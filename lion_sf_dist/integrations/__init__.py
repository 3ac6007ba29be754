"""Glue for the training frameworks users already run: HF Trainer, Lightning, torchtitan.

Each submodule imports its framework, so import the one you use:

- :mod:`lion_sf_dist.integrations.transformers`: ``LionSFTrainer`` (and a mixin for other
  ``Trainer`` subclasses), exact under DDP and DeepSpeed ZeRO 1-3, resumable from the
  Trainer's own checkpoints.
- :mod:`lion_sf_dist.integrations.lightning`: ``LionSFDeepSpeedCallback`` for Lightning's
  ``DeepSpeedStrategy``; under ``ModelParallelStrategy`` (FSDP2, TP) nothing is needed.
- :mod:`lion_sf_dist.integrations.torchtitan`: ``lion_sf_optimizer(...)``, the optimizer
  entry of a torchtitan 0.3 trainer config (``LionSFOptimizersContainer``).
"""
