"""Multi-GPU data parallelism under torchrun, and a no-op for a single process.

    torchrun --nproc_per_node 8 draft_lv.py --reward hpsv2

The rule that makes N processes equivalent to one: every rank holds the same random state (same seed, same
checkpoint) and draws every random number for the *global* batch (prompts, initial noise, DDIM noise), then
keeps its contiguous share (`shard`). The ranks therefore sample exactly the images one process with the
same `--batch-size` would sample, split N ways. Rewards are gathered where an algorithm needs statistics of
the global batch (DDPO's per-prompt tracker, GRPO's groups, RWR's weights); LoRA gradients are averaged with one
all-reduce after the backward pass (`average_gradients`). That is DistributedDataParallel's arithmetic
without wrapping the UNet: these scripts call the UNet T times or more per backward pass, under activation
checkpointing and gradient accumulation, which DDP's per-forward hooks do not fit. Only rank 0 writes files.
Backend: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> World:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); else a world of one.
    On CUDA each process uses the GPU of its LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        # torch asks for destroy_process_group() before exit: left to the interpreter's teardown, the group's
        # threads were sometimes destroyed while running ("terminate called without an active exception", SIGABRT)
        atexit.register(cleanup)
    return World(dist.get_rank(), dist.get_world_size())


def launched_world_size() -> int:
    """The number of processes torchrun launched (1 without torchrun), known before any process group exists:
    the flag checks use it to refuse a batch that does not split over the processes."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank under torchrun (0 without it), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def check_batch_split(batch_size: int, sample_batch_size: int | None = None, num_minibatches: int = 1,
                      train_batch_size: int | None = None) -> int:
    """Refuse (UserError) a global `batch_size` that does not split evenly into: one share per process, each share
    into sampling chunks of `sample_batch_size`, into `num_minibatches` minibatches (one optimizer update each), each
    minibatch into training chunks of `train_batch_size` (gradients accumulate over them). Returns the minibatch
    size per process."""
    from .errors import require

    size = launched_world_size()
    require(batch_size % size == 0, f"--batch-size {batch_size} (the global batch) must divide among {size} processes")
    local = batch_size // size
    if sample_batch_size is not None:
        require(local % sample_batch_size == 0, f"--batch-size {batch_size} over {size} process(es) must be a "
                f"multiple of --sample-batch-size {sample_batch_size} per process")
    require(local % num_minibatches == 0, f"--batch-size {batch_size} over {size} process(es) must be a multiple of "
            f"--num-minibatches {num_minibatches}")
    minibatch = local // num_minibatches
    if train_batch_size is not None:
        require(minibatch % train_batch_size == 0, f"--batch-size {batch_size} over {size} process(es) and "
                f"{num_minibatches} minibatch(es) is {minibatch} images per update and process, which must be a "
                f"multiple of --train-batch-size {train_batch_size}")
    return minibatch


def world() -> World:
    """The current world (a world of one outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def shard(x):
    """This rank's contiguous share of a global batch (a tensor along dim 0, or a list)."""
    w = world()
    if w.size == 1:
        return x
    n = len(x)
    if n % w.size:
        raise ValueError(f"a global batch of {n} cannot be split evenly over {w.size} processes")
    k = n // w.size
    return x[w.rank * k : (w.rank + 1) * k]


def randn(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """N(0, I) noise of this rank's `shape` (dim 0 = local batch). Draws from the shared RNG (generator None)
    are made for the global batch and sharded, so the ranks' noise is independent and equals one process's;
    an explicit generator (sample grids, evaluation) is used as is."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    size = world().size
    if generator is None and size > 1:
        full = torch.randn((shape[0] * size, *shape[1:]), device=gen_device)
        return shard(full).to(device)
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def randint(high: int, n: int, device=None) -> torch.Tensor:
    """n integers uniform in [0, high), drawn for the global batch and sharded like `randn`."""
    return shard(torch.randint(0, high, (n * world().size,), device=device))


def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch of a per-rank tensor (dim 0), in rank order: the inverse of `shard`."""
    w = world()
    if w.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def average_gradients(params) -> None:
    """Average the gradients of `params` over the ranks (one flat all-reduce); a no-op for one process."""
    w = world()
    if w.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if `flag` is true on any rank (keeps the ranks' control flow in step)."""
    if world().size == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. the run directory's time-stamped name)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
