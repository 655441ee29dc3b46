"""torchrun / DistributedDataParallel set-up and the few collective helpers the tool needs."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from dnrt.errors import DNRTError


def is_distributed() -> bool:
    """True once a process group is running."""
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when torchrun (or torch.distributed.run) started this process with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def get_rank() -> int:
    """This process's rank; torchrun's RANK before the group starts and after it ends."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 writes files and prints."""
    return get_rank() == 0


def select_device(requested: str | None) -> torch.device:
    """The device for this process: the requested one, else CUDA (this process's local GPU) when available."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():  # as the authors' tool does
        if is_main_process():
            print(f"device {name!r}: CUDA is not available, running on the CPU", flush=True)
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise DNRTError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def refuse_no_dist(no_dist: bool) -> None:
    """`no_dist=True` (the authors' "forcibly disable distributed mode") cannot hold under torchrun's processes."""
    if no_dist and launched_by_torchrun():
        raise DNRTError(f"no_dist=True, but torchrun started {os.environ['WORLD_SIZE']} processes: run without "
                        f"torchrun, or drop no_dist")


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun prepared: NCCL on GPUs, Gloo on CPU; nothing when run as one process."""
    if not launched_by_torchrun() or is_distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=attempt_store(),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def attempt_store() -> dist.Store:
    """torchrun's store, under a prefix of its own per restart attempt: after `--max-restarts` restarts the workers,
    Gloo can read the keys the killed attempt left in the store and fail to connect or hang (torch 2.14.1; see
    tests/gloo_restart_demo.py), so each attempt keys its rendezvous apart."""
    rank = int(os.environ["RANK"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=rank == 0 and not hosted_by_agent)
    return dist.PrefixStore(f"dnrt/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a list of numbers over all processes."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (what rank 0 decided, e.g. about the run folder)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()
