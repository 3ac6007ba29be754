"""Every private torch name lion_sf_dist uses, in one fenced place, each with the reason.

Checked on torch 2.13.0 (``CHECKED_ON``); ``tests/test_structure.py`` asserts that each
still exists, so a torch release that renames one fails there, not in a user's run.
Nothing else in the package names a private torch attribute or module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

CHECKED_ON = ("2.13.0",)


def is_fsdp1_flat_param(p: Tensor) -> bool:
    """Whether ``p`` is a view FSDP1 (``FullyShardedDataParallel``) flattened.

    FSDP1 marks such views with ``_fsdp_flattened`` and offers no public predicate; LionSF
    must refuse them (a shard of an unmarked 1-D concatenation cannot be counted per unit).
    """
    return bool(getattr(p, "_fsdp_flattened", False))


def compiled_inner_module(model: nn.Module) -> Optional[nn.Module]:
    """The user's module inside ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``), else ``None``.

    No public accessor exists; checkpoints name parameters as the user's module does.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The buffers ``module.state_dict()`` would hold, by qualified name (shared ones once).

    Reads ``_buffers`` and ``_non_persistent_buffers_set``: ``named_buffers()`` does not say
    which buffers are persistent, and ``state_dict()`` would run FSDP2's state-dict hooks
    (gathers) that a checkpoint of local shards must not trigger.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for mname, m in module.named_modules():
        for bname, b in m._buffers.items():
            if b is None or bname in m._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out[f"{mname}.{bname}" if mname else bname] = b
    return out


def sharded_tensor(
    shards: Sequence[tuple[Sequence[int], Sequence[int], Tensor]],
    all_boxes: Sequence[tuple[int, Sequence[int], Sequence[int]]],
    size: torch.Size,
    rank: int,
    dtype: torch.dtype,
) -> "ShardedTensor":
    """A ``ShardedTensor`` of logical ``size`` whose local shards are ``(offsets, sizes, data)``.

    ``all_boxes`` lists ``(rank, offsets, sizes)`` of every rank's shards. DCP writes and
    reads ShardedTensors; ``ShardedTensor`` lives in the private ``torch.distributed._shard``
    package, and its private ``_init_from_local_shards_and_global_metadata`` is the one
    constructor that takes metadata already gathered (the public one runs a collective per
    tensor; the caller gathers every tensor's boxes in one).
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    first = shards[0][2] if shards else torch.empty(0, dtype=dtype)
    device = first.device
    pinned = first.is_pinned() if device.type == "cpu" else False  # ZeRO offload keeps pinned masters
    local = [
        Shard(
            tensor=data,
            metadata=ShardMetadata(
                shard_offsets=list(offsets), shard_sizes=list(sizes), placement=f"rank:{rank}/{device}"
            ),
        )
        for offsets, sizes, data in shards
    ]
    shards_md = [
        ShardMetadata(shard_offsets=list(offsets), shard_sizes=list(sizes), placement=f"rank:{r}/{device}")
        for r, offsets, sizes in all_boxes
    ]
    meta = ShardedTensorMetadata(
        shards_metadata=shards_md, size=size, tensor_properties=TensorProperties(dtype=first.dtype, pin_memory=pinned)
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


def chunk_cat(tensors: Sequence[Tensor], out: Tensor) -> None:
    """Copy ``tensors`` (one dtype, any shapes, none empty) flattened and back to back into ``out`` ``[1, total]``.

    ``torch._chunk_cat`` (what FSDP2 gathers gradients with) is the one op that concatenates
    tensors of different shapes, converting to ``out``'s dtype on the way; the multi-tensor
    path cleans all gradients of skipped units with one ``nan_to_num_`` on the result.
    """
    torch._chunk_cat(list(tensors), 0, 1, out=out)


def version(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place op): tells a step count that moved from one that did not."""
    return t._version


def compile_unguarded(compiled: Any, args: tuple) -> Optional[Callable[..., Any]]:
    """``compiled`` (``torch.compile(fn, fullgraph=True)``) traced now for ``args``, without running it, and
    returned as a function called without dynamo's guards; ``None`` when inductor's caches are disabled.

    ``aot_compile`` (dynamo's experimental ahead-of-time compile, ``torch._dynamo.aot_compile``) and
    its ``disable_guard_check``: the compiled path calls a graph dozens of times a step and its
    guards cost more than a loop over a small tensor; it keeps what they would check itself (the
    batch plan of :mod:`lion_sf_dist.kernel.compiled`). Traced with ``use_duck_shape=False``
    (``torch.fx.experimental._config``), so every dynamic size gets its own symbol and tensors
    that happen to share a size in the traced batch do not make the graph assume they always
    do. It needs inductor's caches (it raises with ``torch.compiler.config.force_disable_caches``).
    """
    import torch.compiler.config
    import torch.fx.experimental._config

    if torch.compiler.config.force_disable_caches:
        return None
    with torch.fx.experimental._config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
        graph = compiled.aot_compile((args, {}))
    graph.disable_guard_check()
    return graph


def dispatch_mode() -> type:
    """``TorchDispatchMode`` (``torch.utils._python_dispatch``): the hook that sees every dispatched op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def local_shape_and_offset(p: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape and global offset of DTensor ``p``'s local shard on this rank.

    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` is what
    DTensor itself uses for checkpoints; stochastic rounding needs each local element's
    index in the logical parameter.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(shape), tuple(offset)


def dcp_metadata_pickle_names() -> dict[tuple[str, str], Any]:
    """The classes and functions a DCP ``.metadata`` pickle refers to (torch 2.13), by ``(module, name)``.

    The restricted unpickler of :mod:`lion_sf_dist.checkpoint.storage` builds these and
    nothing else. Private among them: ``filesystem._StorageInfo``, the per-entry record
    ``FileSystemWriter`` pickles (file, offset, length); ``serialization._get_layout``, how a
    ``torch.layout`` pickles; ``metadata._MEM_FORMAT_ENCODING``, the memory-format enum of
    ``TensorProperties``. A torch that renames one fails here, on import, loudly.
    """
    from torch.distributed.checkpoint import metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.serialization import _get_layout

    public = (
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
    return {
        **{("torch.distributed.checkpoint.metadata", n): getattr(metadata, n) for n in public},
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        ("torch.serialization", "_get_layout"): _get_layout,
    }


def tensor_archive(stream: Any) -> Any:
    """torch's zip-archive reader (``torch._C.PyTorchFileReader``) over ``stream``, one ``torch.save`` archive.

    DCP stores each tensor as a ``torch.save`` archive inside a shard file. Reading it in
    place, without ``torch.load`` copying its data into a new tensor first, needs the
    archive's ``data.pkl`` and its data record's offset and size; torch exposes them only
    through this reader (``torch.load(mmap=True)`` uses it, for whole files only).
    """
    return torch._C.PyTorchFileReader(stream)


def tensor_rebuild_names() -> dict[tuple[str, str], int]:
    """How ``torch.save`` pickles a plain tensor: the ``(module, name)`` of each rebuild function, by version.

    A tensor archive's ``data.pkl`` calls ``torch._utils._rebuild_tensor_v2`` (dtypes with a
    legacy storage class) or ``_rebuild_tensor_v3`` (the others). The unpickler of
    :mod:`lion_sf_dist.checkpoint.items` maps these names to its own descriptions and never
    calls them.
    """
    return {("torch._utils", "_rebuild_tensor_v2"): 2, ("torch._utils", "_rebuild_tensor_v3"): 3}


def names() -> dict[str, bool]:
    """Whether each private name above still exists in the installed torch (pinned by a test)."""
    import torch.fx.experimental._config
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp import _common_utils

    module = nn.Linear(1, 1)
    return {
        "ShardedTensor._init_from_local_shards_and_global_metadata": hasattr(
            ShardedTensor, "_init_from_local_shards_and_global_metadata"
        ),
        "nn.Module._buffers": isinstance(getattr(module, "_buffers", None), dict),
        "nn.Module._non_persistent_buffers_set": isinstance(getattr(module, "_non_persistent_buffers_set", None), set),
        "torch._chunk_cat": hasattr(torch, "_chunk_cat"),
        "Tensor._version": isinstance(torch.zeros(1)._version, int),
        "torch.fx.experimental._config.use_duck_shape": hasattr(torch.fx.experimental._config, "use_duck_shape"),
        "torch.compile(fn).aot_compile": callable(getattr(torch.compile(_identity), "aot_compile", None)),
        "AOTCompiledFunction.disable_guard_check": _has_disable_guard_check(),
        "TorchDispatchMode": isinstance(dispatch_mode(), type),
        "compute_local_shape_and_global_offset": _has_local_offsets(),
        "OptimizedModule._orig_mod": compiled_inner_module(torch.compile(module)) is module,  # type: ignore[arg-type]
        "FSDP1 _fsdp_flattened": getattr(_common_utils, "FSDP_FLATTENED", None) == "_fsdp_flattened",
        "DCP metadata pickle names": len(dcp_metadata_pickle_names()) == 9,
        "tensor rebuild functions": all(
            callable(getattr(importlib.import_module(m), n, None)) for m, n in tensor_rebuild_names()
        ),
        "PyTorchFileReader records": all(
            callable(getattr(torch._C.PyTorchFileReader, m, None))
            for m in ("get_record", "get_record_offset", "get_record_size", "has_record")
        ),
    }


def _identity(x: Tensor) -> Tensor:
    return x


def _has_disable_guard_check() -> bool:
    from torch._dynamo.aot_compile import AOTCompiledFunction

    return callable(getattr(AOTCompiledFunction, "disable_guard_check", None))


def _has_local_offsets() -> bool:
    from torch.distributed.tensor import _utils

    return callable(getattr(_utils, "compute_local_shape_and_global_offset", None))
