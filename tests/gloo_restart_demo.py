"""Without dnrt: torchrun --max-restarts after a SIGKILLed Gloo worker (the failure dnrt.tool.distributed works around).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 --max-restarts 1 \
        tests/gloo_restart_demo.py            # torch 2.14.1: attempt 1 often fails (Gloo connectFullMesh) or hangs
    ... tests/gloo_restart_demo.py --prefix   # the store keyed per attempt, as dnrt does: attempt 1 finishes

On the first attempt rank 1 kills itself with SIGKILL after one all_reduce; torchrun restarts both workers.
Without a prefix the restarted workers can read the killed attempt's keys from torchrun's store, which outlives it.
"""
import os
import signal
import sys

import torch
import torch.distributed as dist

attempt, rank, world = (int(os.environ[k]) for k in ("TORCHELASTIC_RESTART_COUNT", "RANK", "WORLD_SIZE"))
if "--prefix" in sys.argv:
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=world)
else:
    dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank}: all_reduce -> {t.item()}", flush=True)
if attempt == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
print(f"attempt {attempt} rank {rank}: done", flush=True)
dist.destroy_process_group()
