"""Checkpoints that cannot hurt (issue 15): untrusted files, silent corruption, concurrent
writers, torn asynchronous saves, failed loads, errors on one rank, ``keep``.

Each test is named after the case it guards; multi-rank cases run at W=2 on gloo.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import xxhash

from lion_sf_dist import checkpoint
from lion_sf_dist.checkpoint import checksum, store, verification
from lion_sf_dist.checkpoint.storage import METADATA, uncovered
from lion_sf_dist.checkpoint.verification import Verification
from tests import checkpoint_safety_worker as worker
from tests.checkpoint_cases import Tiny, WritesAFile, assert_same, full_state, make_optimizer, train, trained
from tests.harness import run

REPO = Path(__file__).resolve().parents[1]



def _fresh() -> tuple[Tiny, torch.optim.Optimizer]:
    model = Tiny(seed=7)
    return model, make_optimizer(model)


def _reseal(ckpt: Path, name: str) -> None:
    """Update the manifest's size and checksum of ``name`` to its current contents (as an attacker would)."""
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    manifest["files"][name] = (ckpt / name).stat().st_size
    manifest["checksums"][name] = checksum.file_checksum(ckpt / name)
    (ckpt / store.MANIFEST).write_text(json.dumps(manifest))


def test_malicious_metadata_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path / "run", model, opt)
    marker = tmp_path / "pwned"
    (ckpt / METADATA).write_bytes(pickle.dumps(WritesAFile(marker)))
    _reseal(ckpt, METADATA)
    fresh, fresh_opt = _fresh()
    before = full_state(fresh, fresh_opt)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"builtins.exec is not allowed in .*\.metadata"):
        checkpoint.load(tmp_path / "run", fresh, fresh_opt)
    assert not marker.exists(), "the checkpoint's code ran"
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load")


def _blocks_reference(data: bytes, block: int) -> str:
    """The block checksum as the docs define it, written out: XXH3-64 of the blocks' XXH3-64 digests."""
    return xxhash.xxh3_64(b"".join(xxhash.xxh3_64(data[i:i + block]).digest()
                                   for i in range(0, len(data), block))).hexdigest()


_OLDER_FORMATS = {
    "crc32": lambda data: f"{zlib.crc32(data):08x}",  # the first format: eight hex digits
    "xxh3-64-16MiB-blocks": lambda data: _blocks_reference(data, 16 << 20),
    "xxh3-64": lambda data: xxhash.xxh3_64(data).hexdigest(),  # one hash over the whole file
}


def _as_format(ckpt: Path, algorithm: str) -> None:
    """Rewrite the manifest as an earlier format recorded it."""
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    manifest["checksum"] = algorithm
    manifest["checksums"] = {n: _OLDER_FORMATS[algorithm]((ckpt / n).read_bytes()) for n in manifest["checksums"]}
    (ckpt / store.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("block", [None, 1000])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_block_checksum_streamed_and_parallel_equal_the_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   size: int, block: int | None) -> None:
    block = block or 4096
    monkeypatch.setattr(checksum, "BLOCK", block)
    monkeypatch.setattr(checksum, "cores", lambda: 3)
    data = os.urandom(size)
    streamed = checksum.new()
    for i in range(0, size, 777):  # writes that straddle block boundaries
        streamed.update(data[i:i + 777])
    (tmp_path / "f").write_bytes(data)
    expected = _blocks_reference(data, block)
    assert streamed.hexdigest() == expected
    assert checksum.file_checksum(tmp_path / "f") == expected
    assert expected != xxhash.xxh3_64(data).hexdigest() or size <= block  # not the whole-file hash in disguise


def test_block_checksum_sees_two_blocks_swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "BLOCK", 64)
    a, b = os.urandom(64), os.urandom(64)
    (tmp_path / "ab").write_bytes(a + b)
    (tmp_path / "ba").write_bytes(b + a)
    assert checksum.file_checksum(tmp_path / "ab") != checksum.file_checksum(tmp_path / "ba")


def test_files_checksums_reports_each_unreadable_file_and_hashes_the_rest(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "BLOCK", 100)
    data = os.urandom(1000)
    (tmp_path / "ok").write_bytes(data)
    out = checksum.files_checksums([tmp_path / "gone", tmp_path / "ok", tmp_path / "gone2"])
    assert isinstance(out[0], FileNotFoundError) and isinstance(out[2], FileNotFoundError)
    assert out[1] == _blocks_reference(data, 100)


@pytest.mark.parametrize(("mask", "host", "local", "share"), [
    (16, 16, "8", 2),  # torchrun's ranks all see every core: each takes its share
    (2, 16, "8", 2),  # ranks pinned to disjoint cores keep their own
    (2, 2, "2", 1),
    (3, 4, "2", 1),  # overlapping masks: shared, never below one
    (8, 8, None, 8), (8, 8, "1", 8), (8, 8, "x", 8), (8, 8, "0", 8),  # no (valid) LOCAL_WORLD_SIZE: one rank
])
def test_hashing_threads_share_the_host_between_its_ranks(monkeypatch: pytest.MonkeyPatch, mask: int, host: int,
                                                          local: str | None, share: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(mask)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: host)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert checksum.cores() == share


@pytest.mark.parametrize("algorithm", sorted(checksum.READABLE))
def test_checksum_of_an_empty_file(tmp_path: Path, algorithm: str) -> None:
    (tmp_path / "empty").write_bytes(b"")
    expected = _blocks_reference(b"", 4096) if algorithm == checksum.ALGORITHM else _OLDER_FORMATS[algorithm](b"")
    assert checksum.file_checksum(tmp_path / "empty", algorithm) == expected


def _manifested(tmp_path: Path, files: dict[str, bytes]) -> checksum.Checksums:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return checksum.Checksums(checksum.ALGORITHM, checksum.checksums(tmp_path, sorted(files)))


def test_verification_checks_files_started_early_and_files_never_started(tmp_path: Path) -> None:
    sums = _manifested(tmp_path, {"early": os.urandom(5000), "late": os.urandom(3000)})
    (tmp_path / "late").write_bytes(os.urandom(3000))  # changed after the manifest: same size
    check = Verification(tmp_path, sums)
    check.start(["early", "not-listed"])  # unlisted names are not hashed here: check() names them
    try:
        check.check(["early"])
        with pytest.raises(checkpoint.CheckpointCorruptError, match="file 'late' is corrupt"):
            check.check(["early", "late"])
        with pytest.raises(checkpoint.CheckpointCorruptError, match="file 'not-listed' is not in the manifest"):
            check.check(["not-listed"])
    finally:
        check.close()


class _NeverRuns(Future):
    def result(self, timeout=None):
        raise AssertionError("waited for a background job that no thread runs")


class _IdlePool:
    """A pool whose threads never start a job: whatever is checked must be hashed by the checking thread."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def submit(self, fn):
        return _NeverRuns()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def test_verification_runs_the_jobs_no_background_thread_began(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "BLOCK", 512)
    monkeypatch.setattr(verification, "ThreadPoolExecutor", _IdlePool)
    sums = _manifested(tmp_path, {"a": os.urandom(5000), "b": os.urandom(700)})
    data = bytearray((tmp_path / "b").read_bytes())
    data[600] ^= 1  # in b's second block
    (tmp_path / "b").write_bytes(bytes(data))
    check = Verification(tmp_path, sums)
    check.start(["a", "b"])
    try:
        check.check(["a"])
        with pytest.raises(checkpoint.CheckpointCorruptError, match="file 'b' is corrupt"):
            check.check(["b"])
    finally:
        check.close()


def test_verification_started_early_sees_a_change_made_before_the_check(tmp_path: Path) -> None:
    sums = _manifested(tmp_path, {"f": os.urandom(5000)})
    (tmp_path / "f").unlink()
    check = Verification(tmp_path, sums)
    check.start(["f"])
    try:
        with pytest.raises(checkpoint.CheckpointCorruptError, match="file 'f' is unreadable.*No such file"):
            check.check(["f"])
    finally:
        check.close()


def test_load_hashes_shards_before_checking_the_model_and_a_failed_load_leaves_no_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = checkpoint.save(tmp_path, *trained())
    started: list[list[str]] = []
    real_start = Verification.start
    monkeypatch.setattr(Verification, "start", lambda self, names: started.append(names) or real_start(self, names))
    wrong = Tiny(seed=3, out=4)  # b has 4 rows, the checkpoint 3
    try:
        checkpoint.load(tmp_path, wrong, make_optimizer(wrong))
    except checkpoint.ModelMismatchError:  # the failed load's frames (and its reader) are still alive here
        hashing = [t for t in threading.enumerate() if t.name.startswith("lion_sf_dist-verify")]
    else:
        pytest.fail("a model of another shape was loaded")
    shards = sorted(f.name for f in ckpt.glob("*.distcp"))
    assert started == [[store.META, store.EXTRA], shards]  # the shards begun before the model was checked
    assert not hashing, "the background hashing outlived the load"


@pytest.mark.parametrize("algorithm", [checksum.ALGORITHM, *sorted(_OLDER_FORMATS)])
def test_one_float_overwritten_with_1e30_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  algorithm: str) -> None:
    monkeypatch.setattr(checksum, "BLOCK", 256)  # the shard file: several blocks, hashed on several threads
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)
    if algorithm != checksum.ALGORITHM:
        _as_format(ckpt, algorithm)
    assert json.loads((ckpt / store.MANIFEST).read_text())["checksum"] == algorithm
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    assert len(data) > 4 * checksum.BLOCK
    at = data.find(struct.pack("<f", model.a.weight[2, 3].item()))
    assert at > 0
    data[at:at + 4] = struct.pack("<f", 1e30)
    shard.write_bytes(bytes(data))  # same size: the manifest's sizes cannot tell
    fresh, fresh_opt = _fresh()
    before = full_state(fresh, fresh_opt)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"file '{shard.name}' is corrupt.*{algorithm}"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load")


@pytest.mark.parametrize("algorithm", sorted(_OLDER_FORMATS))
def test_manifest_of_an_earlier_format_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    algorithm: str) -> None:
    monkeypatch.setattr(checksum, "BLOCK", 256)  # today's block: an earlier block format must keep its own
    model, opt = trained()
    _as_format(checkpoint.save(tmp_path, model, opt), algorithm)
    fresh, fresh_opt = _fresh()
    checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), f"{algorithm} manifest")


def test_manifest_naming_an_unknown_checksum_is_refused(tmp_path: Path) -> None:
    ckpt = checkpoint.save(tmp_path, *trained())
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    manifest["checksum"] = "md4"
    (ckpt / store.MANIFEST).write_text(json.dumps(manifest))
    fresh, fresh_opt = _fresh()
    before = full_state(fresh, fresh_opt)
    with pytest.raises(checkpoint.CheckpointCorruptError, match="checksums \\('md4'\\) do not match"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load")


def test_shards_not_covering_a_tensor_are_refused(tmp_path: Path) -> None:
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)
    md = pickle.loads((ckpt / METADATA).read_bytes())  # our own file, read to forge a torn one
    entry = md.state_dict_metadata["param/a.weight"]
    entry.chunks[0].sizes = torch.Size([3, 7])  # only rank 0's half of a (6, 7) weight, as a torn save wrote
    (ckpt / METADATA).write_bytes(pickle.dumps(md))
    _reseal(ckpt, METADATA)
    fresh, fresh_opt = _fresh()
    before = full_state(fresh, fresh_opt)
    with pytest.raises(checkpoint.CheckpointCorruptError,
                       match=r"'param/a.weight' is incomplete.*hold 21 of its 42 elements"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), before, "after a refused load")


@pytest.mark.parametrize("boxes,why", [
    ([((0, 0), (3, 7)), ((3, 0), (3, 7))], None),
    ([((0, 0), (3, 7)), ((0, 0), (3, 7)), ((3, 0), (3, 7))], None),  # a replicated piece written twice
    ([((0, 0), (3, 7))], "hold 21 of its 42"),
    ([((0, 0), (4, 7)), ((2, 0), (2, 7))], "overlap"),
    ([((0, 0), (4, 7)), ((3, 0), (3, 7))], "overlap"),
    ([((0, 0), (6, 4)), ((0, 4), (6, 3))], None),
    ([((0, 0), (6, 8))], "outside"),
])
def test_coverage_of_chunks(boxes: list, why: str) -> None:
    result = uncovered((6, 7), boxes)
    assert (result is None) if why is None else (why in result), result


def test_failed_load_changes_nothing_including_checkpoint_hparams(tmp_path: Path) -> None:
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh, fresh_opt = trained(3, seed=5)
    fresh_opt.param_groups[0]["lr"], fresh_opt.pow = 5e-3, 1.0
    before = full_state(fresh, fresh_opt)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=shard.name), pytest.warns(
            UserWarning, match="the checkpoint's values apply once the load succeeds"):
        checkpoint.load(tmp_path, fresh, fresh_opt, hparams="checkpoint")
    assert_same(full_state(fresh, fresh_opt), before, "after a failed load")
    assert (fresh_opt.param_groups[0]["lr"], fresh_opt.pow) == (5e-3, 1.0)


def test_failed_load_garbled_file_of_one_rank_changes_nothing_on_any_rank(tmp_path: Path) -> None:
    results = run(worker.garbled_file_of_one_rank, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["error"] and r["error"].startswith("CheckpointCorruptError: "), (rank, r)
        assert f"'{r['garbled']}' is corrupt" in r["error"], (rank, r)
        assert r["unchanged"], f"rank {rank}: the failed load changed the running model or optimizer"
        assert r["hparams"] == (5e-3, 1.0), (rank, r["hparams"])
        (shards,) = [names for what, names in r["hashing"] if what == "check" and any(".distcp" in n for n in names)]
        began = r["hashing"][:r["hashing"].index(("check", shards))]
        assert ("start in plan", shards) in began, f"rank {rank}: its shards were not hashed from its read plan on"


def test_bad_input_on_rank1_only_raises_on_both_ranks_within_seconds(tmp_path: Path) -> None:
    results = run(worker.one_rank_bad, 2, str(tmp_path / "run"), timeout=120)
    for rank, r in enumerate(results):
        for case, cls, text in (("extra", "CheckpointError", "extra cannot be pickled on rank 1"),
                                ("save_model", "ModelMismatchError", "ranks [1] hold a model"),
                                ("load_model", "ModelMismatchError", "'b.weight' has shape (3, 6)")):
            got = r[case]
            assert got["error"] and got["error"].startswith(f"{cls}: ") and text in got["error"], (rank, case, got)
            assert got["seconds"] < 10, (rank, case, got)
        assert r["complete"] == ["ckpt-00000000"], r["complete"]  # the failed saves committed nothing


def test_two_writers_on_one_root_keep_3(tmp_path: Path) -> None:
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def writer(name: str, saves: int, hold: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.checkpoint_concurrent", str(root),
                                 str(tmp_path / name), str(saves), "1" if hold else "0"], cwd=REPO, env=env,
                                stderr=subprocess.PIPE, text=True)

    slow = writer("slow.pt", 1, hold=True)  # one save, held in the middle of writing its shards
    end = time.time() + 60
    while not (root.is_dir() and any(d.name.startswith(store.TMP) for d in root.iterdir())):
        assert time.time() < end and slow.poll() is None, "the slow writer did not start"
        time.sleep(0.05)
    fast = writer("fast.pt", 4, hold=False)  # four saves with keep=3, pruning while the slow one writes
    _, err = fast.communicate(timeout=120)
    assert fast.returncode == 0, err[-3000:]
    (tmp_path / "slow.pt.go").touch()
    _, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, err[-3000:]
    reported = torch.load(tmp_path / "slow.pt") + torch.load(tmp_path / "fast.pt")
    kept = store.complete(root)
    assert len(kept) == 3 and not [d for d in root.iterdir() if d.name.startswith((store.TMP, store.DELETED))]
    assert {p for p, _ in reported} >= {str(d) for d in kept}
    for path, state in reported:
        if Path(path).exists():  # the others were pruned, whole, by a later save (keep=3)
            model, opt = _fresh()
            checkpoint.load(path, model, opt)
            assert_same(full_state(model, opt), state, path)
    assert Path(torch.load(tmp_path / "slow.pt")[0][0]) == kept[-1], "the last committed is the newest"


def test_async_save_then_destroy_process_group_commits_all_shards(tmp_path: Path) -> None:
    results = run(worker.async_then_destroy, 2, str(tmp_path / "run"), str(tmp_path / "store2"))
    for r in results:
        assert r["error"] is None and r["done"], r["error"]
    assert {r["path"] for r in results} == {str(checkpoint.latest(tmp_path / "run"))}
    model, opt = _fresh()
    checkpoint.load(tmp_path / "run", model, opt)
    assert_same(full_state(model, opt), results[0]["saved"], "save_async torn by destroy_process_group")


@pytest.mark.parametrize("keep", [True, 1.5, 0, -1, "3"])
def test_bad_keep_refused_before_writing(tmp_path: Path, keep: object) -> None:
    model, opt = trained()
    with pytest.raises(ValueError, match="keep must be an int >= 1 or None"):
        checkpoint.save(tmp_path / "run", model, opt, keep=keep)
    with pytest.raises(ValueError, match="keep must be an int >= 1 or None"):
        checkpoint.save_async(tmp_path / "run", model, opt, keep=keep)
    assert not (tmp_path / "run").exists()


def test_prune_failure_is_a_warning_and_the_save_succeeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained()
    checkpoint.save(tmp_path, model, opt, keep=1)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(store, "prune", denied)
    train(model, opt, range(2, 3))
    with pytest.warns(UserWarning, match="was saved, but pruning old checkpoints failed.*Permission denied"):
        path = checkpoint.save(tmp_path, model, opt, keep=1, extra={"step": 3})
    assert path == checkpoint.latest(tmp_path)
    fresh, fresh_opt = _fresh()
    assert checkpoint.load(tmp_path, fresh, fresh_opt) == {"step": 3}
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), "after a failed prune")


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path: Path) -> None:
    model, opt = trained()
    ckpt = checkpoint.save(tmp_path, model, opt)
    manifest = json.loads((ckpt / store.MANIFEST).read_text())
    (ckpt / store.MANIFEST).write_text(json.dumps({"files": manifest["files"]}))  # as written before checksums
    fresh, fresh_opt = _fresh()
    with pytest.warns(UserWarning, match="predates checksums"):
        checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), "checkpoint without checksums")


def test_filesystem_without_locks_is_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, mode: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    with pytest.raises(checkpoint.CheckpointLockError, match="no flock; keep one writer per checkpoint root"):
        checkpoint.save(tmp_path, *trained())
    assert not store.complete(tmp_path)


def test_shard_checksums_computed_while_writing_match_the_files(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    read_back = []
    real = checksum.file_checksum
    monkeypatch.setattr(checksum, "file_checksum", lambda path: read_back.append(path.name) or real(path))
    ckpt = checkpoint.save(tmp_path, *trained())
    assert sorted(read_back) == sorted([METADATA, store.META, store.EXTRA])  # shards: hashed as written
    sums = json.loads((ckpt / store.MANIFEST).read_text())["checksums"]
    assert any(n.endswith(".distcp") for n in sums)
    assert all(real(ckpt / n) == value for n, value in sums.items())
