"""Lightning: LionSF under ``DeepSpeedStrategy`` (a Callback) and ``ModelParallelStrategy`` (nothing to add).

``DeepSpeedStrategy`` builds the engine with plain ``deepspeed.initialize`` from the LionSF
that ``configure_optimizers`` returns; :class:`LionSFDeepSpeedCallback` attaches it
(:func:`lion_sf_dist.deepspeed.attach`) in ``on_fit_start``, which Lightning calls after
the engine is built and before it loads a DeepSpeed checkpoint (``fit(ckpt_path=...)``)::

    trainer = lightning.Trainer(strategy=DeepSpeedStrategy(stage=2), callbacks=[LionSFDeepSpeedCallback()])

Build the LionSF from ``self.named_parameters()`` (names give ``agreement="module"``).
Gradient clipping: Lightning gives DeepSpeed ``gradient_clipping = gradient_clip_val or 0``
(no clipping by default); the callback warns when the engine will clip, since clipping
changes Lion's update signs.

``ModelParallelStrategy`` (FSDP2 in ``configure_model``, optionally tensor parallel) needs
no glue: LionSF built in ``configure_optimizers`` from the sharded parameters is exact, and
Lightning's distributed checkpoint holds ``exp_avg`` as a DTensor like its parameter.
"""

from __future__ import annotations

import warnings

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy

__all__ = ["LionSFDeepSpeedCallback", "CLIPPING_WARNING"]

# The start of the warning issued when the engine will clip gradients.
CLIPPING_WARNING = "LionSFDeepSpeedCallback: DeepSpeed will clip gradients"


class LionSFDeepSpeedCallback(Callback):
    """Attaches the LionSF of ``configure_optimizers`` to the DeepSpeed engine, before any step or resume load.

    Raises ``TypeError`` when the trainer's strategy is not a ``DeepSpeedStrategy``, and what
    :func:`lion_sf_dist.deepspeed.attach` raises (an engine stepping another optimizer, an
    unsupported configuration).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach: Lightning calls this after ``strategy.setup`` built the engine, before it restores a checkpoint."""
        from lion_sf_dist.deepspeed import attach

        strategy = trainer.strategy
        if not isinstance(strategy, DeepSpeedStrategy):
            raise TypeError(
                f"LionSFDeepSpeedCallback needs a DeepSpeedStrategy, the trainer runs "
                f"{type(strategy).__name__} (under ModelParallelStrategy / DDP LionSF needs no callback)"
            )
        engine = strategy.deepspeed_engine
        attach(engine)
        clip = engine.gradient_clipping()
        if clip > 0:
            warnings.warn(
                f"{CLIPPING_WARNING} to norm {clip} (Trainer(gradient_clip_val=...) or the config's "
                "gradient_clipping), which changes Lion's update signs; LionSF's author trains without "
                "clipping",
                UserWarning,
                stacklevel=2,
            )
