"""Several processes on the CPU (Gloo): the tool's strategy='fsdp' (FSDP2) trains the same weights as 'ddp' and saves
full state dicts that load in one process; FSDP1 wraps a converted model."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dnrt
from dnrt.tool.rundir import load_checkpoint
from tiny_config import TINY

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs Gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun(rank: int, port: int, world: int = 2) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def train_tool(rank: int, port: int, config: str, run: str, strategy: str) -> None:
    as_torchrun(rank, port)
    from dnrt.tool.cli import main_py

    assert main_py(["-c", config, "--output_dir", run, "--strategy", strategy, "--epochs", "1"]) == 0


def spawn(fn, *args) -> None:
    mp.start_processes(fn, args=(free_port(), *args), nprocs=2, start_method="spawn")


def test_fsdp2_trains_the_weights_ddp_does_and_saves_full_state(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(TINY)  # RAA + ARR, no dropout: both strategies see the same computation
    for strategy in ("ddp", "fsdp"):
        spawn(train_tool, str(config), str(tmp_path / strategy), strategy)
    ddp, fsdp = (load_checkpoint(tmp_path / s / "checkpoint.pth") for s in ("ddp", "fsdp"))
    assert ddp["model"].keys() == fsdp["model"].keys()
    for key, value in ddp["model"].items():
        assert not hasattr(fsdp["model"][key], "to_local")  # full, plain tensors: they load anywhere
        torch.testing.assert_close(fsdp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in ddp["arr"].items():
        torch.testing.assert_close(fsdp["arr"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert fsdp["arr"]["memory.count"].sum() > 0
    assert fsdp["optimizer"].keys() == ddp["optimizer"].keys()
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    for i, state in ddp["optimizer"]["state"].items():
        torch.testing.assert_close(fsdp["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-6)


def fsdp1(rank: int, port: int) -> None:
    as_torchrun(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        dnrt.convert(model, torch.randn(2, 6))
        assert isinstance(model[1], dnrt.RAA) and all(p.dim() > 0 for p in model.parameters())
        arr = dnrt.ARR(model, 3, layers=["1"])
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))  # FSDP1 on the CPU
        y = torch.tensor([0, 1, 2, 0])
        loss = wrapped(torch.randn(4, 6)).sum() + arr.loss(y)
        loss.backward()
        assert all(p.grad is not None for p in wrapped.parameters())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp1_wraps_a_converted_model():
    spawn(fsdp1)
