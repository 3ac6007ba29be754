"""Run as a script: save a checkpoint, then die (SIGKILL) in the middle of writing the next one.

``python -m tests.checkpoint_kill ROOT OUT``: trains, saves (step 1), writes the saved full
state to ``OUT``, trains on and starts a second save whose shard writer kills the process
after writing part of a tensor. The test then checks ``ROOT`` still loads the first save.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed.checkpoint.filesystem as fs

from lion_sf_dist import checkpoint
from tests.checkpoint_cases import Tiny, full_state, make_optimizer, train


def _dying_write_item(*args, **kwargs):
    stream = args[1]
    stream.write(b"\0" * 64)  # part of a tensor reaches the file, then the process dies
    stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(root: str, out: str) -> None:
    model = Tiny()
    opt = make_optimizer(model)
    train(model, opt, range(2))
    checkpoint.save(root, model, opt, extra={"step": 1})
    torch.save(full_state(model, opt), out)
    train(model, opt, range(2, 4))
    fs._write_item = _dying_write_item
    checkpoint.save(root, model, opt, extra={"step": 2})
    raise AssertionError("the save should have killed this process")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
