"""Checkpoints reshard across world sizes and layouts, and resuming equals not stopping.

One chain of runs (one spawn per world size, in the pytest process for W=1) writes and
reads every checkpoint; the tests below check its pieces:

    W=1 plain --------------------------------> W=2 DDP
    W=3 FSDP2 (resume check) -> W=4 FSDP2 (resume check) -> W=3, W=2 FSDP2, W=1 plain
    W=2 DDP (resume check) -> W=1;  W=2 FSDP2 -> W=1
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lion_sf_dist import checkpoint
from tests import checkpoint_worker as worker
from tests.checkpoint_cases import STEPS, Tiny, assert_same, full_state, make_optimizer, train
from tests.harness import run


def _load_single(root: Path) -> dict:
    model = Tiny(seed=7)
    opt = make_optimizer(model)
    extra = checkpoint.load(root, model, opt)
    return {"state": full_state(model, opt), "extra": extra}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ckpt")
    roots = {k: str(tmp / k) for k in ("w1", "w3", "w4", "ddp2", "fsdp2_2")}
    model = Tiny()
    opt = make_optimizer(model)
    train(model, opt, range(STEPS))
    out: dict = {"w1_saved": full_state(model, opt)}
    checkpoint.save(roots["w1"], model, opt, extra={"step": STEPS})
    out["w3a"] = run(worker.world3, 3, "", roots["w3"], timeout=400)
    out["w4"] = run(worker.world4, 4, roots["w3"], roots["w4"], timeout=400)
    out["w3b"] = run(worker.world3, 3, roots["w4"], "", timeout=400)
    out["w2"] = run(worker.world2, 2, roots["w4"], roots["w1"], roots["ddp2"], roots["fsdp2_2"], timeout=400)
    out["w1_from4"] = _load_single(Path(roots["w4"]))
    out["w1_from_ddp2"] = _load_single(Path(roots["ddp2"]))
    out["w1_from_fsdp2_2"] = _load_single(Path(roots["fsdp2_2"]))
    return out


def _every_rank(results: list, key: str) -> list:
    return [r[key] for r in results]


@pytest.mark.parametrize("world", [3, 4])
def test_fsdp2_resume_equals_uninterrupted(chain: dict, world: int) -> None:
    for rank, r in enumerate(_every_rank(chain["w3a" if world == 3 else "w4"], "resume")):
        assert_same(r["resumed"], r["uninterrupted"], f"W={world} rank {rank} resumed vs uninterrupted")
        assert r["extra"] == {"step": STEPS, "world": world}
        # the continuation moved away from the saved state: the comparison above is not vacuous
        assert not all(r["saved"]["params"][n].equal(r["resumed"]["params"][n]) for n in r["saved"]["params"])


@pytest.mark.parametrize("src,dst", [(4, 1), (4, 2), (4, 3), (3, 4)])
def test_fsdp2_reshard(chain: dict, src: int, dst: int) -> None:
    saved = (chain["w4"][0]["resume"] if src == 4 else chain["w3a"][0]["resume"])["saved"]
    loaded = {1: lambda: [chain["w1_from4"]], 2: lambda: _every_rank(chain["w2"], "from4"),
              3: lambda: _every_rank(chain["w3b"], "from4"), 4: lambda: _every_rank(chain["w4"], "from3")}[dst]()
    for rank, r in enumerate(loaded):
        assert_same(r["state"], saved, f"FSDP2 W={src} -> W={dst}, rank {rank}")
        assert r["extra"]["step"] == STEPS and r["extra"]["world"] == src


@pytest.mark.parametrize("layout", ["hsdp", "tp"])
def test_fsdp2_w3_to_2d_meshes_w4(chain: dict, layout: str) -> None:
    saved = chain["w3a"][0]["resume"]["saved"]
    for rank, r in enumerate(_every_rank(chain["w4"], f"{layout}_from3")):
        assert_same(r["state"], saved, f"FSDP2 W=3 -> {layout} (2 x 2) W=4, rank {rank}")


def test_single_process_to_ddp(chain: dict) -> None:
    for rank, r in enumerate(_every_rank(chain["w2"], "ddp_from1")):
        assert_same(r["state"], chain["w1_saved"], f"W=1 -> DDP W=2, rank {rank}")
        assert r["extra"] == {"step": STEPS}


def test_ddp_resume_and_to_single_process(chain: dict) -> None:
    for rank, r in enumerate(chain["w2"]):
        assert_same(r["ddp_resumed"], r["ddp_uninterrupted"], f"DDP W=2 rank {rank} resumed vs uninterrupted")
    assert_same(chain["w1_from_ddp2"]["state"], chain["w2"][0]["ddp_saved"], "DDP W=2 -> W=1")


def test_fsdp2_w2_to_single_process(chain: dict) -> None:
    assert_same(chain["w1_from_fsdp2_2"]["state"], chain["w2"][0]["fsdp2_saved"], "FSDP2 W=2 -> W=1")


def test_fsdp2_async_save_holds_the_state_of_its_call(chain: dict) -> None:
    for rank, r in enumerate(chain["w2"]):
        assert_same(r["async_loaded"], r["fsdp2_saved"], f"FSDP2 W=2 asynchronous save, rank {rank}")


def test_missing_and_truncated_named_on_every_rank(chain: dict) -> None:
    for r in chain["w2"]:
        assert r["errors"]["missing"].startswith("CheckpointNotFoundError: checkpoint path"), r["errors"]
        assert "does not exist" in r["errors"]["missing"], r["errors"]
        assert r["errors"]["truncated"].startswith("CheckpointCorruptError: "), r["errors"]
        assert "__0_0.distcp' is truncated" in r["errors"]["truncated"], r["errors"]


def test_wrong_model_named_on_every_rank(chain: dict) -> None:
    for message in _every_rank(chain["w4"], "wrong"):
        assert "'b.weight' has shape (3, 6) in the checkpoint but (4, 6)" in message, message
        assert "'b.bias'" in message, message
