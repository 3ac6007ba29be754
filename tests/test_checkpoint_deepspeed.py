"""DeepSpeed checkpoints: ZeRO-2 at W=3 -> ZeRO-3 at W=2 -> one process, hot restart, and FSDP2 <-> ZeRO."""

from __future__ import annotations

import pytest
import torch

from lion_sf_dist import checkpoint
from tests import checkpoint_deepspeed_worker as worker
from tests.checkpoint_cases import STEPS, Tiny, assert_same, batch, full_state, make_optimizer
from tests.harness import run


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ds")
    roots = {k: str(tmp / k) for k in ("z2", "f3", "z3")}
    out = {"w3": run(worker.world3, 3, roots["z2"], roots["f3"], timeout=400)}
    out["w2"] = run(worker.world2, 2, roots["z2"], roots["f3"], roots["z3"], timeout=400)
    for key in ("z2", "z3"):
        model = Tiny(seed=7)
        opt = make_optimizer(model)
        extra = checkpoint.load(roots[key], model, opt)
        out[f"w1_from_{key}"] = {"state": full_state(model, opt), "extra": extra, "output": model(batch(0)[0]).detach()}
    return out


def test_zero2_resume_equals_uninterrupted(chain: dict) -> None:
    for rank, r in enumerate(chain["w3"]):
        assert_same(r["z2_resumed"], r["z2_uninterrupted"], f"ZeRO-2 W=3 rank {rank} resumed vs uninterrupted")
        assert not r["z2_saved"]["params"]["a.weight"].equal(r["z2_resumed"]["params"]["a.weight"])


def test_zero2_w3_to_zero3_w2_and_single_process(chain: dict) -> None:
    saved = chain["w3"][0]["z2_saved"]
    for rank, r in enumerate(chain["w2"]):
        assert_same(r["z3_from_z2"], saved, f"ZeRO-2 W=3 -> ZeRO-3 W=2, rank {rank}")
        assert r["z3_extra"] == {"step": STEPS}
        assert_same(r["z0_from_z2"], saved, f"ZeRO-2 W=3 -> ZeRO-0 W=2, rank {rank}")
        assert_same(r["z3sub_from_z2"], saved, f"ZeRO-2 W=3 -> ZeRO-3 (sub-groups, offload) W=2, rank {rank}")
    assert_same(chain["w1_from_z2"]["state"], saved, "ZeRO-2 W=3 -> W=1")
    assert_same(chain["w1_from_z3"]["state"], saved, "ZeRO-3 W=2 (reloaded) -> W=1")


def test_loaded_engines_compute_with_the_loaded_weights(chain: dict) -> None:
    expected = chain["w1_from_z2"]["output"]
    for rank, r in enumerate(chain["w2"]):
        for stage in ("z3", "z3sub", "z0"):
            where = f"{stage} rank {rank} forward after load"
            torch.testing.assert_close(r[f"{stage}_output"], expected, rtol=0, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")


def test_deepspeed_fsdp2_both_ways(chain: dict) -> None:
    for rank, r in enumerate(chain["w2"]):
        assert_same(r["fsdp2_from_z2"], chain["w3"][0]["z2_saved"], f"ZeRO-2 W=3 -> FSDP2 W=2, rank {rank}")
        assert_same(r["z3_from_f3"], chain["w3"][0]["f3_saved"], f"FSDP2 W=3 -> ZeRO-3 W=2, rank {rank}")


def test_zero3_fresh_state_restart(chain: dict) -> None:
    saved = chain["w3"][0]["z2_saved"]
    for rank, r in enumerate(chain["w2"]):
        state = r["z3_fresh_from_z2"]
        assert_same({k: state[k] for k in ("params", "buffers")}, {k: saved[k] for k in ("params", "buffers")},
                    f"ZeRO-2 -> ZeRO-3 params only, rank {rank}")
        assert all(not m.any() for m in state["exp_avg"].values()), "exp_avg not reset"
        assert all(not a.any() for a in state["ema"].values()), "agreement averages not reset"
