"""Run as a script: one of two writers saving to the same checkpoint root at once.

``python -m tests.checkpoint_concurrent ROOT OUT SAVES SLOW``: trains a :class:`Tiny` (seed
from ``OUT``'s name), saves ``SAVES`` times with ``keep=3`` (each shard write delayed by
``SLOW`` seconds, so the other writer runs meanwhile), and writes the reported paths with
the state each holds to ``OUT``.
"""

from __future__ import annotations

import sys
import time
import zlib
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as fs

from lion_sf_dist import checkpoint
from tests.checkpoint_cases import Tiny, full_state, make_optimizer, train


def main(root: str, out: str, saves: int, slow: float) -> None:
    write = fs._write_item

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        time.sleep(slow)
        return write(*args, **kwargs)

    fs._write_item = slow_write
    model = Tiny(seed=zlib.crc32(out.encode()) % 1000)
    opt = make_optimizer(model)
    reported = []
    for step in range(saves):
        train(model, opt, range(step, step + 1))
        path = checkpoint.save(root, model, opt, extra={"writer": out, "step": step}, keep=3)
        reported.append((str(path), full_state(model, opt)))
    torch.save(reported, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
