"""How `dnrt reproduce` runs its cells besides one after another: several at once on this machine (`--launcher local
--jobs N`) or as a SLURM job array through submitit (`--launcher slurm`), and each cell's job record (`job.json`
in its run folder), from which `--status` tells done, running, failed and pending cells without the submitting shell.

Every cell runs as its own `dnrt train -c CONFIG OVERRIDES --output_dir=RUN` process (under `torch.distributed.run`
with several GPUs), so a requeued or repeated job continues through the run folder's auto-continue.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dnrt.errors import DNRTError
from dnrt.tool import rundir

try:  # the [cluster] extra: only the SLURM launcher needs it
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - without submitit, the local launcher and --status still work
    Checkpointable = object  # type: ignore[assignment,misc]

RECORD = rundir.JOB  # the job record dnrt writes into a cell's run folder (--overwrite counts it as dnrt's)
HEARTBEAT_S = 60.0  # a running job rewrites its record this often; three missed beats on another host = lost
QUEUED, RUNNING, REQUEUED, FINISHED, FAILED, STOPPED = "submitted", "running", "requeued", "finished", "failed", \
    "stopped"
STOP_GRACE_S = 60.0  # how long a stopped cell may take to reach its next batch before it is killed
TIMEOUT_REQUEUES = 20  # requeues after reaching the time limit (submitit's default, 3, is short for 300 epochs)


@dataclass(frozen=True)
class CellRun:
    """One run of a cell: its `dnrt train` config, overrides and run folder (absolute, so a job finds them)."""

    name: str
    config: str
    overrides: tuple[str, ...]
    run_dir: str
    epochs: int
    cwd: str = field(default_factory=os.getcwd)

    def command(self, processes: int = 1) -> list[str]:
        """`python -m dnrt train ...`, under `python -m torch.distributed.run --nproc_per_node=N` for N > 1."""
        train = ["-m", "dnrt", "train", "-c", self.config, *self.overrides, f"--output_dir={self.run_dir}"]
        if processes > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    *train]
        return [sys.executable, *train]

    def finished(self) -> bool:
        return any(r.get("epoch") == self.epochs - 1 for r in rundir.read_log(self.run_dir))


# ---------------------------------------------------------------- the job record
def read_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's job record, {} without one."""
    path = Path(run_dir) / RECORD
    return rundir.read_json(path) if path.is_file() else {}


def write_record(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Update the job record with `fields` (atomically; the folder is created)."""
    folder = rundir.usable_folder(run_dir)
    record = {**read_record(folder), **fields}
    rundir.write_json(folder / RECORD, record)
    return record


def _here() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def alive(record: dict[str, Any]) -> bool:
    """Whether the process a record names still runs: its pid on this host, its heartbeat on another."""
    if record.get("host") == socket.gethostname() and record.get("pid"):
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - record.get("heartbeat", 0) < 3 * HEARTBEAT_S


def last_error_line(path: Optional[str]) -> Optional[str]:
    """The last line of a job's error stream that is not submitit's own logging."""
    if not path or not Path(path).is_file():
        return None
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("submitit ")]
    return lines[-1] if lines else None


# ---------------------------------------------------------------- one cell's process
def child_env(threads: int, gpus: Optional[Sequence[int]] = None) -> dict[str, str]:
    """The environment of a cell's process: OMP_NUM_THREADS per process, the GPUs it may see."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def _ignore_preempt_signal() -> None:
    """In the cell's process (inherited through exec by torchrun's workers): SLURM sends `--signal` to every process
    of the job; only the job's own process, which asks the cell to stop with SIGTERM, acts on it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def start_cell(run: CellRun, processes: int, env: dict[str, str], stdout: Any = None, stderr: Any = None,
               own_session: bool = False) -> subprocess.Popen:
    """The cell's process; in a session of its own where its launcher forwards the signals (a terminal's Ctrl-C
    would otherwise reach it twice)."""
    return subprocess.Popen(run.command(processes), cwd=run.cwd, env=env, stdout=stdout, stderr=stderr,
                            preexec_fn=_ignore_preempt_signal, start_new_session=own_session)


def stop_cell(pid: int, grace_s: float = STOP_GRACE_S) -> Optional[int]:
    """SIGTERM (the cell stops at its next batch, its last finished epoch saved), SIGKILL after `grace_s`; returns
    its exit code where this call reaped it. Safe in a signal handler: it reaps with os.waitpid, not Popen's lock."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.time() + grace_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.2)


def end_state(run: CellRun, returncode: int, stderr: Optional[str]) -> dict[str, Any]:
    """The record's fields when a cell's process has ended."""
    if returncode == 0 and run.finished():
        return {"state": FINISHED, "ended": time.time(), "returncode": 0, "error": None}
    signalled = returncode < 0 or returncode - 128 in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
    error = last_error_line(stderr) if returncode else f"exited 0 but {rundir.LOG} lacks epoch {run.epochs - 1}"
    return {"state": STOPPED if signalled else FAILED, "ended": time.time(), "returncode": returncode,
            "error": error or f"exited with code {returncode}"}


# ---------------------------------------------------------------- several cells at once on this machine
def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[int]:
    """The GPU indices this process may use (CUDA_VISIBLE_DEVICES' order), [] without CUDA."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def split_resources(jobs: int, gpus_per_job: int, cores: int, gpus: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(threads, GPU indices) for each of `jobs` slots: cores split so that processes x threads <= cores, GPUs in
    disjoint groups of `gpus_per_job` (none on a machine without GPUs)."""
    if jobs < 1:
        raise DNRTError(f"--jobs must be at least 1, got {jobs}")
    if jobs > cores:
        raise DNRTError(f"--jobs {jobs} is more than the {cores} usable CPU cores of this machine")
    if gpus and jobs * max(gpus_per_job, 1) > len(gpus):
        raise DNRTError(f"--jobs {jobs} x --gpus_per_job {gpus_per_job} needs {jobs * gpus_per_job} GPUs; "
                        f"this machine has {len(gpus)}")
    per_job = max(gpus_per_job, 1) if gpus else 0
    slots = []
    for k in range(jobs):
        group = list(gpus[k * per_job:(k + 1) * per_job])
        slots.append((max(1, cores // (jobs * max(len(group), 1))), group))
    return slots


def run_local(runs: Sequence[CellRun], jobs: int, gpus_per_job: int, log_dir: Path,
              log: Callable[[str], None] = print) -> dict[str, int]:
    """Run the cells, `jobs` at once, each with its share of cores and GPUs; return {cell name: exit code}.

    Each cell's output goes to LOG_DIR/<name>.out and .err; its record names them. Ctrl-C or SIGTERM stops every
    running cell at its next batch (they continue when the command is repeated)."""
    slots = split_resources(jobs, gpus_per_job, usable_cores(), visible_gpus() if gpus_per_job else [])
    log_dir = rundir.usable_folder(log_dir, "log folder")
    pending, active, codes = to_run(runs, log), {}, {}
    free = list(range(len(slots)))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or active:
            while pending and free:
                slot, run = free.pop(0), pending.pop(0)
                active[slot] = (run, *_start_local(run, slots[slot], gpus_per_job, log_dir, log))
            time.sleep(0.2)
            for slot, (run, process, err, beat) in list(active.items()):
                code = process.poll()
                if code is None:
                    if time.time() - beat > HEARTBEAT_S:
                        write_record(run.run_dir, heartbeat=time.time())
                        active[slot] = (run, process, err, time.time())
                    continue
                record = write_record(run.run_dir, **end_state(run, code, str(err)))
                log(f"{run.name}: {record['state']}" + (f" ({record['error']}; log {err})" if code else ""))
                codes[run.name] = code
                del active[slot]
                free.append(slot)
    except BaseException:
        for run, process, err, _ in active.values():
            code = stop_cell(process.pid)
            write_record(run.run_dir, **end_state(run, -signal.SIGINT if code is None else code, str(err)))
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM to the local launcher: stop its cells as Ctrl-C does."""
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _start_local(run: CellRun, slot: tuple[int, list[int]], gpus_per_job: int, log_dir: Path,
                 log: Callable[[str], None]) -> tuple[subprocess.Popen, Path, float]:
    threads, gpus = slot
    out, err = log_dir / f"{run.name}.out", log_dir / f"{run.name}.err"
    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        process = start_cell(run, max(len(gpus), 1), child_env(threads, gpus if gpus or not gpus_per_job else None),
                             stdout, stderr, own_session=True)
    write_record(run.run_dir, launcher="local", job_id=str(process.pid), state=RUNNING, started=time.time(),
                 stdout=str(out), stderr=str(err), host=socket.gethostname(), pid=process.pid, heartbeat=time.time(),
                 command=run.command(max(len(gpus), 1)), error=None, returncode=None)
    where = f", GPUs {','.join(map(str, gpus))}" if gpus else ""
    log(f"{run.name}: started ({threads} threads{where}) -> {run.run_dir}")
    return process, err, time.time()


# ---------------------------------------------------------------- SLURM (or submitit's local executor) job arrays
class CellJob(Checkpointable):
    """A cell as a submitit job: `job(run)` runs the cell's process and waits for it. When SLURM signals the time
    limit or a preemption (`--signal`, submitit's USR2), submitit calls `checkpoint(run)`: the cell stops at its
    next batch, its finished epochs saved, and the job is requeued with the same call, which continues the run
    from its checkpoint.pth. SIGTERM (scancel, preemption) reaches the cell's process directly and stops it the
    same way; the run then continues when it is submitted again."""

    def __init__(self, gpus: int, cpus: Optional[int] = None) -> None:
        self.gpus, self.cpus = gpus, cpus
        self.pid: Optional[int] = None

    def __call__(self, run: CellRun) -> dict[str, Any]:
        import submitit

        job = submitit.JobEnvironment()
        paths = job.paths
        processes = max(self.gpus, 1)
        cpus = self.cpus or int(os.environ.get("SLURM_CPUS_PER_TASK", usable_cores()))
        write_record(run.run_dir, state=RUNNING, job_id=job.job_id, started=time.time(), stdout=str(paths.stdout),
                     stderr=str(paths.stderr), command=run.command(processes), error=None, returncode=None,
                     **_here())
        process = start_cell(run, processes, child_env(max(1, cpus // processes)))
        self.pid = process.pid
        write_record(run.run_dir, cell_pid=process.pid)
        beat = time.time()
        try:
            while process.poll() is None:
                time.sleep(0.5)
                if time.time() - beat > HEARTBEAT_S:
                    beat = time.time()
                    write_record(run.run_dir, heartbeat=beat)
        except BaseException as e:  # SIGINT (a local cancel), or submitit's end of a job it did not requeue
            if not isinstance(e, SystemExit):  # submitit exits after a requeue: the record says so already
                code = stop_cell(process.pid)
                write_record(run.run_dir, **end_state(run, -signal.SIGINT if code is None else code,
                                                      str(paths.stderr)))
            raise
        record = write_record(run.run_dir, **end_state(run, process.returncode, str(paths.stderr)))
        if record["state"] != FINISHED:
            raise DNRTError(f"{run.name}: {record['error']}")
        best, last = rundir.best_and_last(rundir.read_log(run.run_dir))
        return {"name": run.name, "best_acc1": best, "last_acc1": last}

    def checkpoint(self, run: CellRun) -> Any:
        """submitit's hook on the time-limit/preemption signal: stop the cell, requeue the same call."""
        import submitit

        if self.pid is not None:
            stop_cell(self.pid)
        write_record(run.run_dir, state=REQUEUED, ended=time.time())
        return submitit.helpers.DelayedSubmission(CellJob(self.gpus, self.cpus), run)

    def __getstate__(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "cpus": self.cpus, "pid": None}


@dataclass(frozen=True)
class SlurmOptions:
    """What `dnrt reproduce --launcher slurm` asks of SLURM for each cell."""

    partition: Optional[str] = None
    gpus_per_job: int = 1
    cpus_per_task: Optional[int] = None
    timeout_min: int = 60
    array_parallelism: int = 256
    additional: dict[str, Any] = field(default_factory=dict)
    name: str = "dnrt"

    def parameters(self) -> dict[str, Any]:
        """AutoExecutor.update_parameters' arguments (slurm_* apply on SLURM only)."""
        params: dict[str, Any] = {"name": self.name, "timeout_min": self.timeout_min, "nodes": 1,
                                  "tasks_per_node": 1, "slurm_array_parallelism": self.array_parallelism}
        if self.gpus_per_job:
            params["gpus_per_node"] = self.gpus_per_job
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.additional:
            params["slurm_additional_parameters"] = dict(self.additional)
        return params


def in_queue(record: dict[str, Any]) -> Optional[bool]:
    """Whether SLURM still knows the record's job (squeue), None where it cannot be asked (no squeue here)."""
    try:
        answer = subprocess.run(["squeue", "-h", "-j", str(record["job_id"]), "-o", "%T"], capture_output=True,
                                text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if answer.returncode:  # a job SLURM has forgotten is an invalid id; anything else (no controller): unknown
        return False if "invalid job id" in answer.stderr.lower() else None
    return bool(answer.stdout.strip())


def queued(record: dict[str, Any]) -> bool:
    """Whether the job a record names is still queued or running (squeue for SLURM, the process otherwise)."""
    state = record.get("state")
    if state == RUNNING:
        return alive(record)
    if state not in (QUEUED, REQUEUED):
        return False
    if record.get("launcher") != "slurm":
        return alive(record)
    return bool(in_queue(record))


def to_run(runs: Sequence[CellRun], log: Callable[[str], None] = print) -> list[CellRun]:
    """The runs to start: neither finished nor queued or running in a job of their record."""
    todo = []
    for run in runs:
        record = read_record(run.run_dir)
        if run.finished():
            log(f"{run.name}: finished, skipped ({run.run_dir})")
        elif queued(record):
            log(f"{run.name}: already {record['state']} as job {record['job_id']}, not started again")
        else:
            todo.append(run)
    return todo


def submit(runs: Sequence[CellRun], options: SlurmOptions, folder: Path, cluster: str = "slurm",
           log: Callable[[str], None] = print) -> list[Any]:
    """Submit every run that is neither finished nor queued as one job array (`map_array`); return the jobs.

    `cluster` is submitit's: "slurm", or "local" (its LocalExecutor, every job at once on this machine)."""
    try:
        import submitit
    except ImportError:
        raise DNRTError("--launcher slurm needs submitit: pip install 'dnrt[cluster]'") from None
    todo = to_run(runs, log)
    if not todo:
        return []
    try:
        executor = submitit.AutoExecutor(folder=Path(folder).absolute() / "%j", cluster=cluster,
                                         slurm_max_num_timeout=TIMEOUT_REQUEUES)
    except RuntimeError as e:  # no srun on this machine
        raise DNRTError(f"--launcher slurm: no SLURM here ({e})") from None
    try:
        executor.update_parameters(**options.parameters())
        jobs = executor.map_array(CellJob(options.gpus_per_job, options.cpus_per_task), todo)
    except (ValueError, NameError, submitit.core.utils.FailedJobError) as e:
        raise DNRTError(f"submission failed: {' '.join(str(e).split())}") from None
    for run, job in zip(todo, jobs):
        if read_record(run.run_dir).get("job_id") != job.job_id:  # unless the job has started already
            write_record(run.run_dir, launcher=cluster, job_id=job.job_id, state=QUEUED, submitted=time.time(),
                         stdout=str(job.paths.stdout), stderr=str(job.paths.stderr), error=None, returncode=None,
                         host=socket.gethostname() if cluster == "local" else None,
                         pid=int(job.job_id) if cluster == "local" else None)
        log(f"{run.name}: job {job.job_id} -> {run.run_dir} (log {job.paths.stdout})")
    return jobs


# ---------------------------------------------------------------- --status
def cell_status(run: CellRun) -> tuple[str, str]:
    """(state, detail) of a run from its folder alone: done (best/last top-1), running (epoch, job), failed (the last
    error line, the log), pending (queued, or not started, or stopped with its epochs kept)."""
    rows = rundir.read_log(run.run_dir)
    record = read_record(run.run_dir)
    job = f"job {record['job_id']}" if record.get("job_id") else ""
    if run.finished():
        best, last = rundir.best_and_last(rows)
        value = "-" if best is None else f"best {best:.2f}, last {last:.2f}"
        return "done", f"{value} ({len(rows)} epochs)"
    state = record.get("state")
    if state == RUNNING:
        if alive(record):
            return "running", f"epoch {len(rows) + 1}/{run.epochs}, {job}"
        return "failed", (f"{job} ended without a word (killed?) at epoch {len(rows) + 1}/{run.epochs}; "
                          f"log {record.get('stderr')}")
    if state in (QUEUED, REQUEUED):
        if record.get("launcher") == "slurm" and in_queue(record) is False:
            return "failed", f"{job} left the queue without running (cancelled?); log {record.get('stderr')}"
        return "pending", f"{state}, {job}" + (f", {len(rows)}/{run.epochs} epochs done" if rows else "")
    if state in (FAILED, STOPPED):
        return "failed", f"{record.get('error')}; log {record.get('stderr')}"
    return "pending", f"{len(rows)}/{run.epochs} epochs done, no job running it" if rows else "not started"


def status_table(runs: Sequence[CellRun]) -> str:
    """One Markdown table: every run, its state and what to know about it, then the counts per state."""
    lines = ["| cell | state | detail |", "|---|---|---|"]
    counts: dict[str, int] = {}
    for run in runs:
        state, detail = cell_status(run)
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"| {run.name} | {state} | {detail} |")
    order = ("done", "running", "failed", "pending")
    lines += ["", ", ".join(f"{counts.get(s, 0)} {s}" for s in order) + f" of {len(runs)} runs"]
    return "\n".join(lines) + "\n"
