"""The tool's choice of intra-op threads and data workers (dnrt/tool/threads.py) under a fake affinity, cgroup
quota and environment, and what a training run then uses and logs."""
import json
import re

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from dnrt.tool import threads
from dnrt.tool.cli import main_py
from tiny_config import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Files(Dataset):
    """Stands for a dataset read from files."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(3), 0


def fake_cgroup(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({}, None),
])
def test_cgroup_quota_v2_and_v1(tmp_path, files, cpus):
    assert threads.cgroup_cpus(fake_cgroup(tmp_path, files)) == cpus


@pytest.mark.parametrize("affinity, quota, local_world, cores, share", [
    (8, None, None, 8, 8),
    (8, "150000 100000", None, 2, 2),  # a quota of 1.5 cores may use 2 at once
    (2, "800000 100000", None, 2, 2),  # the affinity is the tighter bound
    (8, None, "4", 8, 2),              # torchrun's 4 processes on this node share the cores
    (2, None, "4", 2, 1),
])
def test_usable_cores_and_the_share_of_each_process(tmp_path, monkeypatch, affinity, quota, local_world, cores,
                                                   share):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    root = fake_cgroup(tmp_path, {"cpu.max": quota} if quota else {})
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.usable_cores(root) == cores
    assert threads.cores_per_process(root) == share


def test_in_memory_datasets_get_no_workers_and_an_explicit_count_wins():
    tensors = TensorDataset(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
    assert threads.data_workers(None, tensors, 64, CPU, 8) == (0, "in-memory dataset")
    assert threads.data_workers(None, Subset(Subset(tensors, [1, 2]), [0]), 64, CUDA, 8)[0] == 0
    assert threads.data_workers(3, tensors, 64, CPU, 8) == (3, "num_workers")
    assert threads.data_workers(12, Files(), 64, CPU, 2) == (12, "num_workers")


@pytest.mark.parametrize("device, cores, batch, workers", [
    (CUDA, 16, 256, 8), (CUDA, 4, 256, 4), (CUDA, 4, 2, 2), (CPU, 8, 256, 4), (CPU, 2, 256, 1), (CPU, 1, 256, 1)])
def test_workers_of_a_file_dataset_never_exceed_the_cores(device, cores, batch, workers):
    assert threads.data_workers(None, Files(), batch, device, cores) == (workers, f"{cores} usable cores")


def test_intra_op_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.intra_op_threads(8, 4, CPU, 1e9) == (4, "8 usable cores")
    assert threads.intra_op_threads(2, 0, CPU, 1e9) == (2, "2 usable cores")
    assert threads.intra_op_threads(2, 4, CPU, 1e9) == (1, "2 usable cores")
    assert threads.intra_op_threads(8, 4, CUDA, None) == (8, "8 usable cores")
    assert threads.intra_op_threads(8, 0, CPU, 16e6) == (1, "small ops, 16 MFLOP each")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.intra_op_threads(2, 0, CPU, 16e6) == (3, "OMP_NUM_THREADS")


def test_op_size_is_the_forward_flops_per_weight_layer_times_the_batch():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).train()
    flops = 2 * (10 * 20 + 20 * 5)  # per sample: two matmuls, 2 FLOPs per multiply-add
    assert threads.mean_op_flops(model, torch.zeros(1, 10), 64) == pytest.approx(flops / 2 * 64)
    assert model.training  # the counting forward leaves the mode as it was


@pytest.mark.parametrize("omp, line", [
    (None, r"threads: 1 intra-op \(small ops, \d MFLOP each\), 0 data workers \(in-memory dataset\)"),
    ("2", r"threads: 2 intra-op \(OMP_NUM_THREADS\), 0 data workers \(in-memory dataset\)"),
])
def test_a_run_logs_its_choice_once_records_the_workers_and_restores_the_threads(tmp_path, monkeypatch, capsys,
                                                                                  omp, line):
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "tiny.py").write_text(TINY.replace("num_workers = 0", "num_workers = None"))
    before = torch.get_num_threads()
    assert main_py(["-c", str(tmp_path / "tiny.py"), "--output_dir", str(tmp_path / "run"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("threads: ") == 1 and re.search(f"^{line}$", out, re.M)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_workers"] == 0
    assert torch.get_num_threads() == before
