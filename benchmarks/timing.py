"""Timing shared by the benchmark scripts: candidates in interleaved rounds, ratios taken per round."""
from __future__ import annotations

import statistics
from typing import Callable, Dict

import torch
from torch.utils.benchmark import Timer


def side_by_side(fns: Dict[str, Callable[[], None]], device: torch.device, rounds: int = 9,
                 min_run_time: float = 0.2) -> Dict[str, tuple]:
    """``{name: (median ms, median per-round ratio to the first fn)}`` over interleaved timing rounds."""
    for fn in fns.values():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    base = times[next(iter(fns))]
    return {name: (statistics.median(t), statistics.median(a / b for a, b in zip(t, base)))
            for name, t in times.items()}
