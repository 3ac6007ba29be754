"""Lightning cases for ``tests/test_lightning.py``, run inside one spawned gloo group.

Lightning replaces a training DataLoader's sampler with a *shuffling* ``DistributedSampler``,
even for a DataLoader that asked for no shuffling; the tests pass
``use_distributed_sampler=False`` and a ``DistributedSampler(shuffle=False)`` of their own, so
rank ``r`` reads samples ``r, r + W, ...`` (:func:`lightning_samples`).

The dataset holds one global batch, so each epoch is one step and the run resumes from the
checkpoint at the end of epoch ``STEPS // 2 - 1``: Lightning resumes a plain DataLoader
from its first batch whatever was read before the checkpoint (a checkpoint taken at an
epoch's end included, which it resumes as the epoch's last batch), so with several
batches per epoch the resumed run would read other batches than the uninterrupted one.

Lightning refuses CPU for ``DeepSpeedStrategy`` (its ``setup_environment`` checks for a CUDA
accelerator); :class:`CPUDeepSpeedStrategy` skips that check only, and DeepSpeed runs on its
CPU accelerator (``DS_ACCELERATOR=cpu``). ``ModelParallelStrategy`` runs on CPU as it is.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from lion_sf_dist import LionSF
from lion_sf_dist.integrations.lightning import LionSFDeepSpeedCallback
from tests.integration_model import PER_DEVICE, STEPS, Tiny, dataset, make_lion_sf, reference
from tests.integration_runs import State, full_state, shared_dir

EPOCH_STEPS = 1


def lightning_samples(step: int, rank: int, world: int) -> list[int]:
    """Dataset indices of ``rank``'s batch at ``step`` under a non-shuffling ``DistributedSampler``."""
    k = step % EPOCH_STEPS
    return [(k * PER_DEVICE + j) * world + rank for j in range(PER_DEVICE)]


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU, for tests: Lightning's GPU assumptions bypassed, nothing else changed.

    ``setup_environment`` refuses a non-CUDA accelerator, ``setup_distributed`` refuses
    device indices other than the local ranks (CPU devices have none) and DeepSpeed is
    handed ``root_device.index`` as its device rank; DeepSpeed is given the gloo group the
    harness already started, and the root device carries the local rank as its index.
    """

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        import deepspeed

        reset_seed()
        self.set_world_ranks()
        deepspeed.init_distributed(dist_backend="gloo")


class TinyModule(LightningModule):
    """``Tiny`` as ``self.net``, LionSF from named parameters; under ``ModelParallelStrategy`` (``strategy``):

    ``"fsdp2"``: ``fully_shard`` per layer and at the root on the data-parallel mesh;
    ``"tp_fsdp"``: first ``inp`` column-parallel and ``out`` row-parallel on the
    tensor-parallel mesh (5 hidden units over 2 ranks: uneven), then the same FSDP2.
    """

    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.net = Tiny()
        self.strategy_name = strategy
        self.batches_seen = 0

    def configure_model(self) -> None:
        if self.strategy_name not in ("fsdp2", "tp_fsdp"):
            return
        from torch.distributed.fsdp import fully_shard

        if self.strategy_name == "tp_fsdp":
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"inp": ColwiseParallel(output_layouts=Replicate()),
                                "out": RowwiseParallel(input_layouts=Replicate())})
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net.inp, self.net.norm, self.net.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches_seen += 1
        return self.net(batch["x"], batch["labels"])["loss"]

    def configure_optimizers(self) -> LionSF:
        return make_lion_sf(list(self.named_parameters()), prefix="net.")


@dataclass
class Case:
    """One Lightning run: ``strategy`` ("deepspeed2", "deepspeed3", "fsdp2", "tp_fsdp"), with the callback or not."""

    name: str
    strategy: str
    callback: bool = True  # LionSFDeepSpeedCallback, under the DeepSpeed strategies
    resume: bool = True
    clip: Optional[float] = None  # Trainer(gradient_clip_val=...)


def _strategy(name: str) -> Any:
    if name.startswith("deepspeed"):
        return CPUDeepSpeedStrategy(stage=int(name[-1]), process_group_backend="gloo")
    tp = dist.get_world_size() if name == "tp_fsdp" else 1
    return ModelParallelStrategy(data_parallel_size=dist.get_world_size() // tp, tensor_parallel_size=tp)


def data_parallel(name: str) -> tuple[int, int]:
    """(data-parallel size, this rank's index in it): tensor-parallel ranks read the same batches."""
    if name == "tp_fsdp":
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def _fit(case: Case, out: str, ckpt_path: Optional[str] = None) -> tuple[Trainer, TinyModule]:
    module = TinyModule(case.strategy)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=out, filename="{epoch}", every_n_epochs=1, save_top_k=-1,
                                            save_on_train_epoch_end=True)]
    if case.callback and case.strategy.startswith("deepspeed"):
        callbacks.append(LionSFDeepSpeedCallback())
    trainer = Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=_strategy(case.strategy),
                      max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, use_distributed_sampler=False, gradient_clip_val=case.clip)
    replicas, index = data_parallel(case.strategy)
    samples = dataset(replicas, EPOCH_STEPS)
    sampler = torch.utils.data.DistributedSampler(samples, num_replicas=replicas, rank=index, shuffle=False)
    data = torch.utils.data.DataLoader(samples, batch_size=PER_DEVICE, sampler=sampler)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


def _state(trainer: Trainer, module: TinyModule) -> State:
    """Full parameters and ``exp_avg`` by name (without the ``net.`` prefix), gathered when sharded."""
    named = [(n.removeprefix("net."), p) for n, p in module.named_parameters()]
    return full_state(named, None if isinstance(trainer.strategy, DeepSpeedStrategy) else trainer.optimizers[0])


def run_case(case: Case) -> dict[str, Any]:
    """Fit ``STEPS`` steps; with ``resume`` also fit again from the checkpoint at step ``STEPS // 2``."""
    with shared_dir("lion_sf_pl_") as out:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer, module = _fit(case, out)
            except RuntimeError as e:
                if case.callback:
                    raise
                return {"error": str(e)}
        result: dict[str, Any] = {"final": _state(trainer, module), "warnings": [str(w.message) for w in caught],
                                  "strategy": type(trainer.strategy).__name__, "error": None,
                                  "param_types": sorted({type(p).__name__ for p in module.parameters()})}
        if case.resume:
            trainer, module = _fit(case, out, ckpt_path=os.path.join(out, f"epoch={STEPS // 2 - 1}.ckpt"))
            result["resumed"] = _state(trainer, module)
            result["resumed_steps"] = (trainer.global_step, module.batches_seen)
        return result


def run_cases(rank: int, world: int, cases: list[Case]) -> dict[str, Any]:
    """Every case on this rank, and (rank 0) the single-process reference, single-threaded like the ranks."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    results: dict[str, Any] = {case.name: run_case(case) for case in cases}
    if rank == 0:
        results["reference"] = {dp: reference(dp, lightning_samples, data_steps=EPOCH_STEPS) for dp in (1, world)}
    return results
