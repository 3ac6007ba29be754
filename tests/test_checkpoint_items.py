"""Tensor items read in place from a mapped shard file (``lion_sf_dist.checkpoint.items``).

The reference is ``torch.load`` of the same archive bytes (what DCP's own reader does);
hostile archives are built from real ``torch.save`` output, recombined.
"""

from __future__ import annotations

import errno
import functools
import gc
import io
import mmap
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lion_sf_dist import checkpoint
from lion_sf_dist.checkpoint import CheckpointCorruptError, UnsafeCheckpointError, mapping
from lion_sf_dist.checkpoint.items import view_item
from lion_sf_dist.checkpoint.mapping import MappedFile
from lion_sf_dist.opcount import count_ops
from tests.checkpoint_cases import Tiny, WritesAFile, assert_same, full_state, make_optimizer, trained


def _archive(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _file_of(tmp_path: Path, archives: list[bytes]) -> tuple[MappedFile, list[tuple[int, int]]]:
    """The archives in one file at odd offsets, with junk around them, as DCP packs items; their spans."""
    data, spans = bytearray(os.urandom(3)), []
    for archive in archives:
        spans.append((len(data), len(archive)))
        data += archive + os.urandom(5)
    (tmp_path / "shard").write_bytes(bytes(data))
    return MappedFile(tmp_path / "shard"), spans


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = (torch.rand(7, 9, generator=gen) * 100 - 50).to(dtype)
    return [
        base,
        base[:, 2:5],  # a view: the archive holds the whole storage, the tensor an offset and strides
        base.t(),
        base[3:],
        base[0, 0].clone(),  # 0-d
        base[:0],  # empty
    ]


_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
    torch.uint32,
]


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.reshape(-1).contiguous().view(torch.uint8).tolist())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bits."""
    return (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()) and _bits(a) == _bits(b)


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_view_item_equals_torch_load_and_copies_nothing(tmp_path: Path, dtype: torch.dtype) -> None:
    archives = [_archive(t) for t in _tensors(dtype)]
    file, spans = _file_of(tmp_path, archives)
    mapping = file.as_tensor()
    lo, hi = mapping.data_ptr(), mapping.data_ptr() + file.size
    for archive, (offset, length) in zip(archives, spans):
        expected = torch.load(io.BytesIO(archive), weights_only=True)
        stored = view_item(file, offset, length, "test")
        assert (stored.dtype, stored.shape) == (expected.dtype, expected.shape)
        if expected.numel():
            assert lo <= stored.data.data_ptr() < hi, "the item was copied, not viewed in the mapping"
        assert _same(stored.value(), expected.contiguous())
        for target in (torch.empty_like(expected), torch.empty(expected.shape[::-1], dtype=dtype).t()):
            stored.copy_to(target)  # as a load copies: byte for byte, into any layout
            assert _same(target, torch.empty_like(target).copy_(expected)), target.stride()
    if dtype.is_floating_point and dtype.itemsize > 1:
        converted = torch.empty(_tensors(dtype)[1].shape, dtype=torch.float64)
        view_item(file, *spans[1], "test").copy_to(converted)  # another dtype: converted, as DCP's copy_ did
        assert torch.equal(converted, _tensors(dtype)[1].to(torch.float64))


def test_view_item_of_an_archive_written_on_a_big_endian_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 1.5 - 2
    swapped = original.clone()
    swapped.untyped_storage().byteswap(torch.float32)  # its bytes: the big-endian encoding of original
    with monkeypatch.context() as m:
        m.setattr(sys, "byteorder", "big")  # what torch.save records as the writer's byte order
        archive = _archive(swapped)
    file, [(offset, length)] = _file_of(tmp_path, [archive])
    assert torch.equal(torch.load(io.BytesIO(archive), weights_only=True), original)  # torch swaps back
    assert torch.equal(view_item(file, offset, length, "test").value(), original)


def _rezip(archive: bytes, **replace: bytes) -> bytes:
    """The archive rewritten with some records' contents replaced (``data_pkl`` for ``data.pkl``)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            leaf = info.filename.split("/", 1)[1].replace(".", "_").replace("/", "_")
            dst.writestr(info.filename, replace.get(leaf, src.read(info.filename)))
    return out.getvalue()


def _pkl_of(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_rezipped_archive_still_reads(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.float32)
    archive = _rezip(_archive(t))
    file, [(offset, length)] = _file_of(tmp_path, [archive])
    assert torch.equal(view_item(file, offset, length, "test").value(), t)


def test_hostile_archives_are_refused_and_run_nothing(tmp_path: Path) -> None:
    six = _archive(torch.arange(6, dtype=torch.float32))
    pkl = _pkl_of(six)
    assert pkl.count(b"K\x00K\x06\x85") == 1  # storage offset 0, size (6,)
    cases = {
        "parameter": (_archive(nn.Parameter(torch.ones(2))), UnsafeCheckpointError, "is not allowed"),
        "code": (_archive(WritesAFile(tmp_path / "ran")), UnsafeCheckpointError, "exec is not allowed"),
        "dict": (_archive({"a": torch.ones(2)}), CheckpointCorruptError, "holds a dict, not a tensor"),
        "truncated": (six[: len(six) // 2], CheckpointCorruptError, "unreadable tensor archive"),
        "view past its storage": (_rezip(six, data_pkl=pkl.replace(b"K\x00K\x06\x85", b"K\x00K\xc8\x85")),
                                  CheckpointCorruptError, "reaching element 200 of a storage of 6"),
        "record shorter than its storage": (_rezip(six, data_0=bytes(8)), CheckpointCorruptError,
                                            "data record of 8 bytes"),
        "unknown byte order": (_rezip(six, byteorder=b"middle"), CheckpointCorruptError, "byte order"),
    }
    for name, (archive, error, why) in cases.items():
        file, [(offset, length)] = _file_of(tmp_path, [archive])
        with pytest.raises(error, match=why) as raised:
            view_item(file, offset, length, f"case {name}")
        assert f"case {name}" in str(raised.value)
        if error is CheckpointCorruptError:
            assert not isinstance(raised.value, UnsafeCheckpointError), name
    assert not (tmp_path / "ran").exists(), "unpickling the item ran its code"
    file, [(offset, length)] = _file_of(tmp_path, [six])
    with pytest.raises(CheckpointCorruptError, match="lies outside its file"):
        view_item(file, offset, length + 100, "test")



def _mapped(path: Path) -> list[str]:
    """The lines of this process's memory map that map a file under ``path``."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]


def test_load_reads_in_place_and_unmaps_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained()
    checkpoint.save(tmp_path, model, opt)

    def dcp_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("DCP's own reader ran: the items were torch.load-ed and copied twice")

    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemReader, "read_data", dcp_read)
    fresh = Tiny(seed=7)
    fresh_opt = make_optimizer(fresh)
    checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), "in-place read")
    assert _mapped(tmp_path) == [], "a checkpoint file is still mapped after the load"


def test_a_parse_error_in_a_corrupt_file_is_reported_as_its_checksum(tmp_path: Path) -> None:
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    at = data.find(b"PK\x01\x02")  # the first item's zip directory: its archive no longer parses
    data[at : at + 4] = b"\x00\x00\x00\x00"
    shard.write_bytes(bytes(data))
    fresh = Tiny(seed=7)
    fresh_opt = make_optimizer(fresh)
    before = full_state(fresh, fresh_opt)
    with pytest.raises(CheckpointCorruptError, match=f"file '{shard.name}' is corrupt"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load")
    gc.collect()  # the exception's traceback held the failed parse's frames, and they the file
    assert _mapped(tmp_path) == [], "a checkpoint file is still mapped after a failed load"


def test_a_filesystem_that_cannot_map_files_is_read_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``mmap`` fails with ENODEV (some FUSE mounts) files are read: saves and loads work, checks still bite."""
    refused: list[int] = []

    def no_mmap(fileno: int, *args: object, **kwargs: object) -> mmap.mmap:
        refused.append(fileno)
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mapping.mmap, "mmap", no_mmap)
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)  # hashes meta.json and extra.pt through the fallback
    fresh = Tiny(seed=7)
    fresh_opt = make_optimizer(fresh)
    checkpoint.load(tmp_path, fresh, fresh_opt)
    assert refused, "mmap was never tried: the fallback was not exercised"
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), "load without mmap")

    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    before = full_state(fresh, fresh_opt)
    with pytest.raises(CheckpointCorruptError, match=f"file '{shard.name}' is corrupt"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load without mmap")

    with open(shard, "rb") as f:  # a file that shrank after its size was taken is read as far as it goes
        assert bytes(mapping._file_bytes(f, len(data) + 100)) == bytes(data)


def test_other_mapping_errors_are_not_read_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only "this filesystem cannot map" falls back; any other mapping error names the file as unreadable."""
    model, opt = trained()
    checkpoint.save(tmp_path, model, opt)

    def failing(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mapping.mmap, "mmap", failing)
    fresh = Tiny(seed=7)
    fresh_opt = make_optimizer(fresh)
    before = full_state(fresh, fresh_opt)
    with pytest.raises(CheckpointCorruptError, match="unreadable.*Cannot allocate memory"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a load whose files could not be mapped")


def test_a_record_reaches_its_target_in_one_copy(tmp_path: Path) -> None:
    """Same dtype: one ``copy_`` from the mapping and nothing allocated (on a GPU, one host-to-device
    copy per record); another dtype: one aligned clone, then the converting copy."""
    base = torch.randn(6, 10)
    file, spans = _file_of(tmp_path, [_archive(base), _archive(base.t())])
    for span, shape in zip(spans, [(6, 10), (10, 6)]):
        stored = view_item(file, *span, "test")
        target = torch.empty(shape)
        ops = count_ops(functools.partial(stored.copy_to, target)).ops
        assert ops["copy_"] == 1 and not {"clone", "empty", "empty_strided", "_to_copy", "contiguous"} & set(ops), ops
        assert torch.equal(target, base if shape == (6, 10) else base.t())
    converted = torch.empty(6, 10, dtype=torch.float64)
    ops = count_ops(lambda: view_item(file, *spans[0], "test").copy_to(converted)).ops
    assert ops["clone"] == 1 and ops["copy_"] == 1, ops
    assert torch.equal(converted, base.double())
