"""Timing shared by the benchmark scripts: candidates in interleaved rounds, ratios taken per round; a header."""
from __future__ import annotations

import datetime
import platform
import statistics
import sys
import timeit
from typing import Callable, Dict, List

import torch
from torch.utils.benchmark import Timer

import dnrt


def _synchronised_timer() -> float:
    """A wall clock read after the GPU's queue is empty, so that a timed call includes its kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return timeit.default_timer()


def rounds(fns: Dict[str, Callable[[], None]], rounds: int = 9, min_run_time: float = 0.2) -> Dict[str, List[float]]:
    """``{name: [ms of one call, per round]}``: every candidate once per round, one round after another, so that a
    drift in the machine's speed reaches all candidates alike (each is called once first, to warm up)."""
    for fn in fns.values():
        fn()
    _synchronised_timer()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = Timer("fn()", globals={"fn": fn}, timer=_synchronised_timer, num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return times


def summary(times: Dict[str, List[float]], base: str) -> Dict[str, tuple]:
    """``{name: (median ms, median of the per-round ratios to base, spread (min, max) of those ratios)}``."""
    out = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times[base])]
        out[name] = (statistics.median(t), statistics.median(ratios), (min(ratios), max(ratios)))
    return out


def side_by_side(fns: Dict[str, Callable[[], None]], rounds_: int = 9, min_run_time: float = 0.2) -> Dict[str, tuple]:
    """``summary`` of interleaved ``rounds`` with the first candidate as the baseline."""
    return summary(rounds(fns, rounds_, min_run_time), next(iter(fns)))


def header(device: torch.device) -> str:
    """Machine, device, library versions, date and command line: the facts a figure needs beside it."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import timm
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{platform.node()}: {where}; torch {torch.__version__}, Triton {triton_version}, timm {timm.__version__}, "
            f"dnrt {dnrt.__version__}; {date}\ncommand: python {' '.join(sys.argv)}")
