"""Scale-out on PyTorch's own engine: DDP, or FSDP2 sharding, around an untouched model.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op on
one process. State dicts always travel in the full, unsharded form keyed by parameter names,
so a run saved at one world size resumes at any other.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from igpt.errors import IgptError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IgptError("--device cuda asked for, but no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise IgptError(f"unknown device {name!r}: use cpu or cuda")
    return torch.device(name)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer that stops now has seen all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def init_world(device: str | None = None) -> World:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def close_world(world: World, finished: bool) -> None:
    """Leave the process group; after a normal end, only once every rank has reached this point.

    A rank that left early went on to interpreter shutdown while gloo's worker thread could still
    be releasing its last collective's tensors, which takes the GIL: the thread was killed
    mid-destructor and the process aborted ("terminate called without an active exception").
    The barrier, waited on with the GIL released, lets that release finish first. After an error
    it is skipped: the other ranks may never arrive.
    """
    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, fsdp: bool = False) -> torch.nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP2 (sharded weights, gradients, optimizer state)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if world.distributed:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        return model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "blocks") else model


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on the micro-batches before the last of an accumulation."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else nullcontext()


def on_main(world: World, fn):
    """Run `fn` on rank 0 only and hand its result (or its IgptError) to every rank."""
    if not world.distributed:
        return fn()
    box = [None]
    if world.is_main:
        try:
            box[0] = ("ok", fn())
        except IgptError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise IgptError(value)
    return value


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return value


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """Unsharded model (and optimizer) state on the CPU, keyed by parameter names (every rank calls this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, [optimizer], options=options)


def load_full_state(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    optimizers = [optimizer] if optimizer is not None else []
    set_state_dict(
        model, optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state or {}, options=options
    )
