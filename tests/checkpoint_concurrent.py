"""Run as a script: one of two writers saving to the same checkpoint root at once.

``python -m tests.checkpoint_concurrent ROOT OUT SAVES HOLD``: trains a :class:`Tiny` (seed
from ``OUT``'s name), saves ``SAVES`` times with ``keep=3`` and writes the reported paths
with the state each holds to ``OUT``. With ``HOLD`` = 1 the first shard write waits until
the file ``OUT.go`` exists, so the other writer runs while this save is in progress.
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as fs

from lion_sf_dist import checkpoint
from tests.checkpoint_cases import Tiny, full_state, make_optimizer, train


def main(root: str, out: str, saves: int, hold: bool) -> None:
    write = fs._write_item
    go = Path(out + ".go")

    def held_write(*args: Any, **kwargs: Any) -> Any:
        end = time.time() + 120
        while not go.exists() and time.time() < end:
            time.sleep(0.02)
        return write(*args, **kwargs)

    if hold:
        fs._write_item = held_write
    model = Tiny(seed=zlib.crc32(out.encode()) % 1000)
    opt = make_optimizer(model)
    reported = []
    for step in range(saves):
        train(model, opt, range(step, step + 1))
        path = checkpoint.save(root, model, opt, extra={"writer": out, "step": step}, keep=3)
        reported.append((str(path), full_state(model, opt)))
    torch.save(reported, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
