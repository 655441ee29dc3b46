"""dnrt reproduce's launchers: several runs at once on this machine, a SLURM job array through submitit (a real
one-node SLURM where it starts, submitit's LocalExecutor everywhere), preemption and requeue, and --status."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnrt.errors import DNRTError
from dnrt.tool import launch as L
from dnrt.tool import reproduce as R

REPO = Path(__file__).resolve().parents[1]
NEEDS_SUBMITIT = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="needs submitit: pip install -e '.[cluster]'")
EPOCHS = 6
# three cells of the digits table; at batch 8 an epoch is 112 steps, so a job can be stopped between epochs
TABLE = ["digits", "--models", "mlp", "--acts", "relu", "gelu", "dnrt", "--epochs", str(EPOCHS),
         "--set", "warmup_epochs=0", "batch_size=8"]


@pytest.fixture(autouse=True)
def in_the_clone(monkeypatch):
    monkeypatch.chdir(REPO)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    return parser.parse_args(list(argv))


def planned(out: Path, argv=TABLE) -> dict[str, R.Planned]:
    args = parse(*argv)
    chosen = R.cells(args.table, args.datasets, args.models, args.acts)
    return {p.cell.column: p for p in R.plan_cells(chosen, out, [None], args.epochs, args.sets)}


def test_resources_are_split_without_oversubscription():
    assert L.split_resources(2, 1, 2, []) == [(1, []), (1, [])]
    assert L.split_resources(2, 2, 16, [0, 1, 2, 3]) == [(4, [0, 1]), (4, [2, 3])]  # 2 jobs x 2 GPUs x 4 threads
    assert L.split_resources(3, 1, 8, [0, 1, 2]) == [(2, [0]), (2, [1]), (2, [2])]
    with pytest.raises(DNRTError, match="--jobs 3 is more than the 2 usable CPU cores"):
        L.split_resources(3, 1, 2, [])
    with pytest.raises(DNRTError, match="needs 4 GPUs; this machine has 3"):
        L.split_resources(2, 2, 16, [0, 1, 2])
    env = L.child_env(3, [2, 5])
    assert (env["OMP_NUM_THREADS"], env["CUDA_VISIBLE_DEVICES"]) == ("3", "2,5")


def test_command_runs_dnrt_train_under_torchrun_with_several_gpus(tmp_path):
    run = planned(tmp_path)["dnrt"].as_run()
    assert run.command(1)[1:5] == ["-m", "dnrt", "train", "-c"]
    assert run.command(1)[-1] == f"--output_dir={tmp_path.resolve()}/{Path(run.run_dir).parent.name}/seed0"
    assert "--epochs=6" in run.command(1) and "--batch_size=8" in run.command(1)
    four = run.command(4)
    assert four[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert four[5:] == run.command(1)[1:]


def test_option_checks_and_sbatch_pass_through():
    assert R.sbatch_options(["account=proj", "--qos=high", "exclusive=true", "mem-per-gpu=8G"]) == {
        "account": "proj", "qos": "high", "exclusive": True, "mem_per_gpu": "8G"}
    with pytest.raises(DNRTError, match="--slurm_additional takes KEY=VALUE"):
        R.sbatch_options(["account"])
    with pytest.raises(DNRTError, match="--jobs is for --launcher local"):
        R.run(parse("digits", "--launcher", "slurm", "--jobs", "2"))
    with pytest.raises(DNRTError, match="--slurm_partition is for --launcher slurm"):
        R.run(parse("digits", "--slurm_partition", "gpu"))
    with pytest.raises(DNRTError, match="--timeout_min must be at least 1"):
        R.run(parse("digits", "--launcher", "slurm", "--timeout_min", "0"))
    options = L.SlurmOptions(partition="gpu", gpus_per_job=4, cpus_per_task=32, timeout_min=600,
                             array_parallelism=8, additional={"account": "proj"})
    assert options.parameters() == {"name": "dnrt", "timeout_min": 600, "nodes": 1, "tasks_per_node": 1,
                                    "slurm_array_parallelism": 8, "gpus_per_node": 4, "cpus_per_task": 32,
                                    "slurm_partition": "gpu", "slurm_additional_parameters": {"account": "proj"}}


def test_dry_run_prints_each_job_and_its_estimated_cost(capsys, tmp_path):
    assert R.run(parse("table6", "--dry_run", "--models", "vit_tiny", "--acts", "relu", "dnrt",
                       "--output-dir", str(tmp_path))) == 0
    out = capsys.readouterr().out
    # ViT-Tiny/4 on CIFAR-100: 300 epochs x (50,000 + 10,000 / 3) images x 30.35 ms / 256 images (one H100 step)
    hours = 300 * (50_000 + 10_000 / 3) * 30.35e-3 / 256 / 3600
    assert out.count(f"~{hours:.2f} GPU-h") == 2
    assert f"estimated cost: {2 * hours:.1f} GPU-hours on H100s" in out
    assert not list(tmp_path.iterdir())
    R.run(parse("table6", "--dry-run", "--models", "vit_tiny", "--acts", "relu", "--output-dir", str(tmp_path),
                "--launcher", "slurm", "--gpus_per_job", "4", "--slurm_additional", "account=proj"))
    out = capsys.readouterr().out
    assert "1 runs (1 cells x 1 seeds)" in out  # both spellings
    assert "'gpus_per_node': 4" in out and "'slurm_additional_parameters': {'account': 'proj'}" in out


def _log(run_dir: Path, epochs: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "test_acc1": 50.0 + e} for e in range(epochs)]
    (run_dir / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_status_tells_every_state_from_the_run_folders(tmp_path, capsys):
    runs = {c: p.as_run() for c, p in planned(tmp_path).items()}
    extra = R.plan_cells(R.cells("digits", models=["vit"], acts=["relu", "gelu", "dnrt"]), tmp_path, [None],
                         EPOCHS, ["warmup_epochs=0", "batch_size=8"])
    runs.update({f"vit_{p.cell.column}": p.as_run() for p in extra})
    _log(Path(runs["relu"].run_dir), EPOCHS)  # done
    _log(Path(runs["gelu"].run_dir), 1)  # running: its process is this one
    L.write_record(runs["gelu"].run_dir, state="running", job_id="17_1", host=socket.gethostname(),
                   pid=os.getpid(), heartbeat=time.time())
    err = tmp_path / "17_2_0_log.err"
    err.write_text("some warning\nerror: data_root /nowhere holds no digits\nsubmitit ERROR (x) - job failed\n")
    L.write_record(runs["dnrt"].run_dir, state="failed", job_id="17_2", stderr=str(err),
                   error=L.last_error_line(str(err)))
    L.write_record(runs["vit_relu"].run_dir, state="submitted", job_id="17_3", launcher="slurm")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    L.write_record(runs["vit_gelu"].run_dir, state="running", job_id="9", host=socket.gethostname(), pid=dead.pid,
                   heartbeat=time.time(), stderr="x.err")
    assert R.run(parse(*TABLE[:3], "vit", *TABLE[3:], "--output-dir", str(tmp_path), "--status")) == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| digits_")}
    state = {name.split("_")[2] + ("" if "_mlp_" in name else "_vit"): v for name, v in rows.items()}
    assert state["relu"] == ["done", "best 55.00, last 55.00 (6 epochs) |"]
    assert state["gelu"] == ["running", "epoch 2/6, job 17_1 |"]
    assert state["dnrt"] == ["failed", f"error: data_root /nowhere holds no digits; log {err} |"]
    assert state["relu_vit"] == ["pending", "submitted, job 17_3 |"]
    assert state["gelu_vit"][0] == "failed" and "job 9 ended without a word (killed?) at epoch 1/6" in \
        state["gelu_vit"][1]
    assert state["dnrt_vit"] == ["pending", "not started |"]


def test_local_jobs_run_two_at_once(tmp_path, capsys):
    argv = ["digits", "--models", "mlp", "--acts", "relu", "gelu", "--epochs", "1", "--set", "batch_size=64"]
    assert R.run(parse(*argv, "--output-dir", str(tmp_path), "--launcher", "local", "--jobs", "2")) == 0
    runs = {c: p.as_run() for c, p in planned(tmp_path, argv).items()}
    records = {c: L.read_record(r.run_dir) for c, r in runs.items()}
    assert all(r["state"] == "finished" and r["launcher"] == "local" for r in records.values())
    assert records["relu"]["started"] < records["gelu"]["ended"] and records["gelu"]["started"] < \
        records["relu"]["ended"]  # at once
    out = capsys.readouterr().out
    assert out.count("(1 threads) ->") == 2 and "| digits | mlp |" in out
    assert all(len(R.read_log(r.run_dir)) == 1 for r in runs.values())


# ---------------------------------------------------------------- the job-array scenario, on SLURM and locally
def _wait(what: str, ready, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _epochs(run: L.CellRun) -> list[int]:
    log = Path(run.run_dir) / "log.txt"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.is_file() else []


def _mid_run(run: L.CellRun) -> bool:
    """Whether the run has finished an epoch and is running; a run that ended first fails the test at once."""
    assert not run.finished(), f"{run.name} finished before it could be stopped: epochs too short on this machine"
    return len(_epochs(run)) >= 1 and L.read_record(run.run_dir).get("state") == "running"


def _files(run: L.CellRun) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(run.run_dir).iterdir())
            if p.is_file() and p.name != L.RECORD}


def scenario(out: Path, submit, kill, capsys, release=lambda record: None) -> None:
    """Submit three cells; stop one with SIGTERM (scancel) mid-run and send another the time-limit signal (it
    saves and is requeued); then submit again: the stopped one continues from its checkpoint, the finished ones
    are not submitted again and their files stay as they were; every log holds each epoch once."""
    runs = {c: p.as_run() for c, p in planned(out).items()}
    submit()
    _wait("relu and gelu past their first epoch", lambda: _mid_run(runs["relu"]) and _mid_run(runs["gelu"]))
    first = L.read_record(runs["gelu"].run_dir)["pid"]
    kill(L.read_record(runs["relu"].run_dir))
    os.kill(first, signal.SIGUSR2)  # SLURM's --signal before the time limit
    _wait("relu to stop", lambda: L.read_record(runs["relu"].run_dir)["state"] in ("stopped", "failed", "finished"))
    _wait("gelu requeued", lambda: L.read_record(runs["gelu"].run_dir)["state"] in ("requeued", "running",
                                                                                    "finished"))
    release(L.read_record(runs["gelu"].run_dir))
    _wait("gelu and dnrt to finish", lambda: runs["gelu"].finished() and runs["dnrt"].finished())
    assert L.read_record(runs["gelu"].run_dir)["pid"] != first, "gelu was not requeued"
    assert len(_epochs(runs["relu"])) < EPOCHS, "relu finished before it was stopped: epochs too short here"
    capsys.readouterr()
    assert R.run(parse(*TABLE, "--output-dir", str(out), "--status")) == 0
    status = capsys.readouterr().out
    assert "| failed | stopped by SIGTERM:" in status and status.count("| done |") == 2, status
    kept = {c: _files(runs[c]) for c in ("gelu", "dnrt")}
    submit()
    assert capsys.readouterr().out.count("finished, skipped") == 2
    _wait("relu to finish", lambda: runs["relu"].finished())
    _wait("relu's job to end", lambda: L.read_record(runs["relu"].run_dir)["state"] == "finished")
    for column, run in runs.items():
        assert _epochs(run) == list(range(EPOCHS)), column  # each epoch once
    for column in ("relu", "gelu"):  # both continued from their checkpoint.pth
        resumes = json.loads((Path(runs[column].run_dir) / "config.json").read_text())["resumes"]
        assert len(resumes) == 1 and resumes[0]["epoch"] >= 1, column
    assert {c: _files(runs[c]) for c in ("gelu", "dnrt")} == kept  # finished runs untouched
    assert R.run(parse(*TABLE, "--output-dir", str(out), "--status")) == 0
    assert capsys.readouterr().out.count("| done |") == 3


@NEEDS_SUBMITIT
def test_job_array_on_submitits_local_executor(tmp_path, capsys):
    def submit():
        runs = [p.as_run() for p in planned(tmp_path).values()]
        L.submit(runs, L.SlurmOptions(gpus_per_job=0, cpus_per_task=1, timeout_min=30), tmp_path / "jobs",
                 cluster="local")

    def kill(record):  # what scancel does on SLURM: SIGTERM to the job's processes (submitit's own ignores it)
        os.kill(record["cell_pid"], signal.SIGTERM)

    scenario(tmp_path, submit, kill, capsys)


@NEEDS_SUBMITIT
def test_job_array_on_a_one_node_slurm(slurm_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])

    def submit():
        assert R.run(parse(*TABLE, "--output-dir", str(tmp_path), "--launcher", "slurm", "--gpus_per_job", "0",
                           "--cpus_per_task", "1", "--timeout_min", "30")) == 0

    def kill(record):
        subprocess.run(["scancel", record["job_id"]], check=True, env=slurm_cluster.env)

    def release(record):  # SLURM holds a requeued job for about 2 minutes (its BeginTime): let it start now
        squeue = ["squeue", "-h", "-j", record["job_id"], "-o", "%T"]
        pending = lambda: subprocess.run(squeue, capture_output=True, text=True, env=slurm_cluster.env).stdout
        _wait("the requeued job", lambda: pending().strip() in ("PENDING", ""))
        subprocess.run(["scontrol", "update", f"JobId={record['job_id']}", "StartTime=now"], env=slurm_cluster.env)

    scenario(tmp_path, submit, kill, capsys, release)
    accounting = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True,
                                env=slurm_cluster.env).stdout
    assert "CANCELLED" in accounting and "COMPLETED" in accounting


def test_a_run_that_a_job_is_running_is_not_trained_again(tmp_path, capsys):
    """Never two processes on one run folder: the sequential launcher leaves a run its record says is running."""
    p = planned(tmp_path)["relu"]
    L.write_record(p.run_dir, state="running", job_id="5_0", launcher="slurm", host=socket.gethostname(),
                   pid=os.getpid(), heartbeat=time.time())
    assert R.run(parse(*TABLE[:4], "relu", *TABLE[7:], "--output-dir", str(tmp_path))) == 0
    assert "running as job 5_0, skipped here" in capsys.readouterr().out
    assert not (p.run_dir / "log.txt").exists()
