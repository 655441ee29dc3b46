"""The quickstart's training throughput with the tool's own thread choice against fixed thread counts, on a quiet
machine and beside one busy process, candidates interleaved and repeated; then the quickstart verbatim, whole.

    python benchmarks/threads.py [--rounds 5] [--epochs 6] [--no-full] [--extra passive] [--dry-run]

Each measurement is a fresh `python -m dnrt train -c quickstart --epochs N` (the environment decides OpenMP's
threads when torch loads, so every candidate needs its own process) in a temporary folder; its throughput is the
median of the logged images/s of all epochs but the first. Candidates:

- `verbatim`: no thread variable set, the tool chooses (dnrt/tool/threads.py), as a user runs it;
- `one thread`: OMP_NUM_THREADS=1, the baseline of the goals;
- `all cores`: OMP_NUM_THREADS=<usable cores>, what torch chose before the tool did (explicit variables win);
- `passive` (--extra): all cores with OMP_WAIT_POLICY=PASSIVE, OpenMP's threads sleeping instead of spinning.

Goals (issue 17): verbatim ≥ 0.8× one thread beside a busy process, ≥ 0.95× quiet; the quickstart verbatim
≤ 60 s on 2 quiet cores, reaching ≥ 97 %.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def candidates(extra: list[str]) -> dict[str, dict[str, str]]:
    from dnrt.tool.threads import usable_cores

    cores = str(usable_cores())
    chosen = {"verbatim": {}, "one thread": {"OMP_NUM_THREADS": "1"}, "all cores": {"OMP_NUM_THREADS": cores}}
    if "passive" in extra:
        chosen["passive"] = {"OMP_NUM_THREADS": cores, "OMP_WAIT_POLICY": "PASSIVE"}
    return chosen


def environment(variables: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return {**env, "PYTHONPATH": str(ROOT), **variables}


def train(variables: dict[str, str], extra_args: list[str]) -> tuple[subprocess.CompletedProcess, Path, float]:
    """One quickstart run in a fresh folder: its process, its log, its wall time."""
    folder = Path(tempfile.mkdtemp(prefix="dnrt-threads-"))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dnrt", "train", "-c", "quickstart", "--output_dir",
                           str(folder / "run"), *extra_args], env=environment(variables), cwd=folder,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"the quickstart failed ({variables or 'verbatim'}):\n{done.stderr[-2000:]}")
    return done, folder / "run" / "log.txt", seconds


def throughput(variables: dict[str, str], epochs: int) -> tuple[float, str]:
    """Images/s of training (the median over the epochs after the first) and the tool's threads line."""
    done, log, _ = train(variables, ["--epochs", str(epochs)])
    rates = [json.loads(line)["images_per_s"] for line in log.read_text().splitlines()]
    choice = re.search(r"^threads: .*$", done.stdout, re.M)
    return statistics.median(rates[1:] or rates), choice.group(0) if choice else "?"


def busy_process() -> subprocess.Popen:
    """One spinning Python process: the 'other job' of a shared machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(names: dict[str, dict[str, str]], rounds: int, epochs: int, busy: bool) -> dict[str, list]:
    """{name: [(images/s, threads line) per round]}, candidates interleaved within each round."""
    other = busy_process() if busy else None
    results: dict[str, list] = {name: [] for name in names}
    try:
        for r in range(rounds):
            for name, variables in names.items():
                results[name].append(throughput(variables, epochs))
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1][0]:.0f}" for n, v in results.items()),
                  flush=True)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return results


def report(title: str, results: dict[str, list], base: str = "one thread") -> None:
    print(f"\n{title}")
    print(f"  {'candidate':<12} {'img/s (median)':>15} {'× one thread (median, min-max)':>32}  threads chosen")
    for name, rows in results.items():
        rates = [rate for rate, _ in rows]
        ratios = [a / b for a, b in zip(rates, (rate for rate, _ in results[base]))]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"  {name:<12} {statistics.median(rates):>15.0f} {spread:>32}  {rows[-1][1]}")


def full_quickstart() -> None:
    """The quickstart command verbatim, as the README gives it, on the machine as it is: time and accuracy."""
    done, _, seconds = train({}, [])
    best = re.search(r"best test top-1 ([0-9.]+)%", done.stdout)
    choice = re.search(r"^threads: .*$", done.stdout, re.M)
    print(f"\nquickstart verbatim, whole: {seconds:.1f} s, best top-1 {best.group(1) if best else '?'} % "
          f"(goals: ≤ 60 s on 2 quiet cores, ≥ 97 %); {choice.group(0) if choice else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions per condition")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per measured run (the first is left out)")
    parser.add_argument("--no-full", action="store_true", help="skip the whole quickstart run at the end")
    parser.add_argument("--extra", nargs="*", default=[], choices=["passive"], help="more candidates")
    parser.add_argument("--dry-run", action="store_true", help="1 round of 1 epoch, no whole run: checks it runs")
    args = parser.parse_args()
    rounds, epochs = (1, 1) if args.dry_run else (args.rounds, args.epochs)

    from dnrt.tool.threads import cgroup_cpus, usable_cores

    import torch

    print(f"# {' '.join(sys.argv)}\n# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {usable_cores()} usable (affinity {len(os.sched_getaffinity(0))}, "
          f"cgroup quota {cgroup_cpus()}), load average {os.getloadavg()[0]:.2f}")
    names = candidates(args.extra)
    for title, busy in (("quiet", False), ("beside one busy process", True)):
        print(f"\n{title}: {rounds} rounds of {', '.join(names)}", flush=True)
        report(title, measure(names, rounds, epochs, busy))
    if not (args.dry_run or args.no_full):
        full_quickstart()


if __name__ == "__main__":
    main()
