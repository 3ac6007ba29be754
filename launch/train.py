"""Train a small GPT-style byte-level language model with LionSF, under torchrun.

The text is Python's own standard library (every install ships it; nothing is
downloaded): files whose path hashes to 0 mod 10 are validation, the rest training.
One script, three engines:

    torchrun --standalone --nproc_per_node=2 launch/train.py --engine ddp --steps 300 --out runs/ddp
    torchrun --standalone --nproc_per_node=3 launch/train.py --engine fsdp2 --steps 300 --out runs/fsdp
    torchrun --standalone --nproc_per_node=2 launch/train.py --engine deepspeed --zero-stage 2 --out runs/ds

``--steps`` is the step to reach: ``--resume`` continues from the newest complete
checkpoint in ``--out`` at whatever world size the job now has, and so does a job that
``torchrun --max-restarts`` restarted after a failure. If that checkpoint is damaged the
run stops and names the newest intact older one, to pass as ``--resume-from PATH``. SIGTERM (preemption) writes a
checkpoint and exits cleanly. gloo on CPU, NCCL on GPU, chosen automatically.

``OUT/metrics.csv`` gets a row every ``--log-every`` steps (training loss, mean LionSF
scale, tokens/s) and every ``--eval-every`` steps; ``val_loss`` is empty in rows without
an evaluation. ``launch/plot.py OUT`` draws it. The run ends with one summary line on stdout.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import sysconfig
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from lion_sf_dist import LionSF, checkpoint
from lion_sf_dist.checkpoint.store import complete

LAUNCH = Path(__file__).resolve().parent


# -- data ---------------------------------------------------------------------------


def stdlib_text(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors, about 90% / 10% of ``max_bytes`` of standard-library source.

    Files are taken in sorted path order; a file whose path hashes to 0 mod 10 goes to
    validation, any other to training, each side until it has its share.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    want = {"train": max_bytes - max_bytes // 10, "val": max_bytes // 10}
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    have = {"train": 0, "val": 0}
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        side = "val" if zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0 else "train"
        if have[side] < want[side]:
            data = path.read_bytes()
            parts[side].append(data)
            have[side] += len(data)
        if all(have[k] >= want[k] for k in want):
            break
    def as_tensor(chunks):
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
    return as_tensor(parts["train"]), as_tensor(parts["val"])


def batch(data: torch.Tensor, batch_size: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch determined by ``seed`` alone, so a resumed run sees the data it would have seen."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + block] for s in starts])
    y = torch.stack([data[s + 1 : s + block + 1] for s in starts])
    return x, y


# -- model --------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, block: int, vocab: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x)).float()  # the loss in fp32 whatever the parameters' dtype
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


# -- engines ------------------------------------------------------------------------


def ds_config(args: argparse.Namespace) -> dict:
    import json

    with open(LAUNCH / f"ds_zero{max(args.zero_stage, 1)}.json") as f:
        config = json.load(f)
    config["zero_optimization"]["stage"] = args.zero_stage
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config.pop("train_batch_size", None)
    return config


def lionsf_options(args: argparse.Namespace) -> dict:
    """LionSF's keyword arguments from the flags (with DeepSpeed they override its JSON's entry)."""
    return dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay, agreement=args.agreement,
                use_triton=args.use_triton)


def build(args: argparse.Namespace, device: torch.device):
    """(model or engine, LionSF, step function)."""
    torch.manual_seed(args.seed)
    model = GPT(args.layers, args.width, args.heads, args.block).to(device)
    hyper = lionsf_options(args)
    if args.engine == "deepspeed":
        from lion_sf_dist import deepspeed as lsd

        config = ds_config(args)
        hyper = {**config.pop("optimizer")["params"], **hyper}  # the flags win over the JSON's LionSF entry
        built = []
        engine, _, _, _ = lsd.initialize(model=model, config=config,
                                         optimizer=lambda params: built.append(LionSF(params, **hyper)) or built[0])

        def step(x, y):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            return loss

        return engine, built[0], step
    if args.engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = LionSF(model.named_parameters(), **hyper)

    def step(x, y):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


@torch.no_grad()
def val_loss(model, data: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for i in range(args.eval_batches):
        x, y = batch(data, args.batch_size, args.block, seed=10**9 + i * dist.get_world_size() + dist.get_rank())
        losses.append(model(x.to(device), y.to(device)))
    model.train(was_training)
    mean = torch.stack(losses).mean()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


# -- main ---------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train a byte-level GPT on the Python standard library with LionSF.")
    ap.add_argument("--engine", choices=["ddp", "fsdp2", "deepspeed"], default="ddp")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 2)")
    ap.add_argument("--steps", type=int, default=300, help="the step to reach (a resumed run continues to it)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="0: only at the end and on SIGTERM")
    ap.add_argument("--out", type=Path, default=Path("runs/train"))
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    ap.add_argument("--resume-from", type=Path, metavar="PATH",
                    help="continue from this checkpoint directory (e.g. an older one when the newest is damaged)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64, help="context length")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="constant; the best of launch/bench_convergence.py's sweep")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--agreement", choices=["tensor", "module", "group", "global"], default="module")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--use-triton", action="store_true", help="LionSF's torch.compile'd step (first step compiles)")
    ap.add_argument("--log-every", type=int, default=10, help="steps between training-loss / scale / tokens/s rows")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (also logged)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--data-bytes", type=int, default=4_000_000, help="how much standard-library text to read")
    args = ap.parse_args(argv)
    for name in ("steps", "layers", "width", "heads", "block", "batch_size", "log_every", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.zero_stage is not None and args.engine != "deepspeed":
        ap.error(f"--zero-stage is a DeepSpeed setting; --engine {args.engine} shards without it")
    if args.zero_stage is None:
        args.zero_stage = 2
    if args.checkpoint_every < 0 or args.lr <= 0 or args.width % args.heads:
        ap.error("--checkpoint-every must be >= 0, --lr > 0, and --width a multiple of --heads")
    return args


@record  # a failing rank's traceback becomes torchrun's reported root cause
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    init_distributed("nccl" if cuda else "gloo")
    if args.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")  # adopts the group made above
    rank, world = dist.get_rank(), dist.get_world_size()
    train, val = stdlib_text(args.data_bytes)
    model, opt, step_fn = build(args, device)
    _KEEP_ALIVE.append((model, opt, step_fn))
    ckpt_dir = args.out / "checkpoints"
    start = 0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun --max-restarts
    if args.resume or args.resume_from or restarted:
        flag = "--resume-from" if args.resume_from else "--resume"
        try:
            start = checkpoint.load(args.resume_from or ckpt_dir, model, opt)["step"]
        except checkpoint.CheckpointNotFoundError as e:
            if args.resume or args.resume_from:
                if rank == 0:
                    print(f"train.py: {flag}: {e}", file=sys.stderr)
                dist.destroy_process_group()
                return 2
        except checkpoint.CheckpointCorruptError as e:
            if rank == 0:
                print(f"train.py: {flag}: {e}\n{intact_hint(checkpoint.latest(args.resume_from or ckpt_dir))}",
                      file=sys.stderr)
            dist.destroy_process_group()
            return 2
        if rank == 0:
            print(f"train.py: resuming at step {start} on {world} processes", file=sys.stderr)
    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))

    def save(step: int) -> None:
        checkpoint.save(ckpt_dir, model, opt, extra={"step": step})

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = args.out / "metrics.csv"
    fields = ["step", "loss", "val_loss", "scale_mean", "tokens_per_s", "world_size"]
    if rank == 0 and (start == 0 or not metrics.exists()):  # a run from step 0 starts a new log
        with open(metrics, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc=f"{args.engine} W={world}", dynamic_ncols=True)
    tokens = args.batch_size * args.block * world
    t0 = time.perf_counter()
    step = start
    last_val: float | None = None
    while step < args.steps:
        x, y = batch(train, args.batch_size, args.block, seed=args.seed * 10**7 + step * world + rank)
        loss = step_fn(x.to(device), y.to(device))
        step += 1
        signalled = stop_requested(stop, device)
        stopping = step == args.steps or signalled
        evaluate = step % args.eval_every == 0 or stopping
        if evaluate or step % args.log_every == 0:  # only here is the loss (and the scale) read off the device
            loss_v = loss.detach().clone()
            dist.all_reduce(loss_v)
            row = dict(step=step, loss=loss_v.item() / world, val_loss="", scale_mean=opt.last_scale.mean().item(),
                       tokens_per_s=tokens * (step - start) / (time.perf_counter() - t0), world_size=world)
            postfix = dict(loss=f"{row['loss']:.3f}", scale=f"{row['scale_mean']:.2f}",
                           tok_s=f"{row['tokens_per_s']:.0f}")
            if evaluate:
                row["val_loss"] = last_val = val_loss(model, val, args, device)
            if last_val is not None:  # the bar keeps the newest validation loss between evaluations
                postfix["val"] = f"{last_val:.3f}"
            if rank == 0:
                with open(metrics, "a", newline="") as f:
                    csv.DictWriter(f, fields).writerow(row)
                bar.set_postfix(postfix)
        if bar is not None:
            bar.update(1)
        if stopping or (args.checkpoint_every and step % args.checkpoint_every == 0):
            save(step)
        if signalled:
            if rank == 0:
                print(f"\ntrain.py: SIGTERM: checkpoint written at step {step}, exiting", file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    if rank == 0:
        print(summary(step, last_val, tokens * (step - start) / (time.perf_counter() - t0), ckpt_dir), flush=True)
    dist.destroy_process_group()
    return 0


def summary(step: int, last_val: float | None, tokens_per_s: float, ckpt_dir: Path) -> str:
    """The one line a run ends with: where it stopped, its last validation loss, speed, newest checkpoint."""
    val = "none this run" if last_val is None else f"{last_val:.4f}"
    return (f"train.py: step {step}: final val loss {val}, {tokens_per_s:.0f} tokens/s, "
            f"checkpoint {checkpoint.latest(ckpt_dir)}")


def intact_hint(damaged: Path) -> str:
    """Which checkpoint older than ``damaged`` (beside it) is intact, checked file by file: a ``--resume-from`` hint."""
    for ckpt in reversed([d for d in complete(damaged.parent) if d.name < damaged.name]):
        try:
            checkpoint.verify(ckpt)
        except checkpoint.CheckpointError:
            continue
        return f"train.py: the newest intact checkpoint is {ckpt}: resume from it with --resume-from {ckpt}"
    return f"train.py: no intact checkpoint older than {damaged}: start afresh, without --resume"


def init_distributed(backend: str) -> None:
    """The default process group, its store keys kept apart per torchrun restart.

    torchrun shares its rendezvous store with the workers; after ``--max-restarts``
    restarts them, a worker could read the previous attempt's addresses from it and fail
    to connect (pytorch/pytorch#135712): a prefix per attempt keeps attempts apart.
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"train-attempt-{attempt}", store),
                            rank=rank, world_size=world)


def stop_requested(stop: dict, device: torch.device) -> bool:
    """Whether any rank got SIGTERM: all ranks agree, so they checkpoint at the same step."""
    flag = torch.tensor([1 if stop["signal"] else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# torch 2.13 can deadlock when DDP's Reducer frees its gloo group (the group's destructor
# joins a worker thread that waits for the GIL the freeing thread holds). The model is kept
# alive here past main() and the process ends with os._exit, also after an error (a peer
# that died, say), so that never runs; every checkpoint and log is written and closed by then.
_KEEP_ALIVE: list = []

if __name__ == "__main__":
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
