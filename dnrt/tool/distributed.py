"""torchrun set-up, the model for several processes (DDP or FSDP2), its full state, and the few collective helpers
the tool needs."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


STRATEGIES = ("ddp", "fsdp")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of each outermost ModuleList or Sequential holding two or more
    modules of one class (timm's and torchvision's `blocks`, `layers`, `layer1`...)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        children = list(module.children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) > 1 \
                and len({type(c) for c in children}) == 1:
            found.extend(children)
            return
        for child in children:
            visit(child)

    visit(model)
    return found


def wrap(model: nn.Module, strategy: str, device: torch.device, find_unused: bool) -> nn.Module:
    """The model for several processes: DistributedDataParallel ('ddp'), or FSDP2 ('fsdp': `fully_shard` on each
    block, then on the root, in place)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        return fully_shard(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (FSDP2's parameters, gradients and norms); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order its state_dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as one process holds them: for a sharded model the full tensors gathered onto
    rank 0's CPU (every process must call it; the others get empty dicts), the optimizer's numbered like
    optimizer.state_dict(), so a checkpoint loads anywhere (DDP, one process, FSDP)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, named = get_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not named:
        return {}, {}
    index = {n: i for i, n in enumerate(_parameter_names(model, optimizer))}
    return weights, {"state": {index[n]: s for n, s in named["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict of a full, numbered state; for a sharded model each process takes its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def even_out(count: int, forward: Any) -> None:
    """Under FSDP every forward is a collective: a process with fewer evaluation batches than another calls
    `forward()` (its output unused) until all have run as many."""
    most = max(all_gather_objects(count))
    for _ in range(most - count):
        forward()
