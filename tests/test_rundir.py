"""The run folder: the same command again continues, reports or refuses; SIGKILL/SIGTERM; resume with more epochs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dnrt.errors import DNRTError
from dnrt.tool import rundir
from dnrt.tool.cli import main_py
from tiny_config import TINY, train_tiny

ROOT = Path(__file__).resolve().parents[1]


def strict_rows(run):
    """log.txt parsed as strict JSON: a NaN/Infinity token fails the test."""
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token} in log.txt")
    return [json.loads(line, parse_constant=refuse) for line in (run / "log.txt").read_text().splitlines()]


def snapshot(folder):
    """Every file below `folder` with its bytes and mtime, but dnrt.lock (each process that takes the folder writes
    itself into it)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def same_weights(a, b):
    for part in ("model", "arr"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch tiny run: (config file, run folder)."""
    return train_tiny(tmp_path_factory.mktemp("finished"))


def test_same_command_on_a_finished_run_reports_and_changes_nothing(finished, capsys):
    config, run = finished
    (run / ".checkpoint.pth.abc.tmp").write_bytes(b"left by a killed process")  # untouched too: nothing runs
    before = snapshot(run)
    capsys.readouterr()
    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    best = max(r["test_acc1"] for r in strict_rows(run))
    last = strict_rows(run)[-1]["test_acc1"]
    assert f"holds a finished run of this config (2 epochs): best top-1 {best:.2f}%, last {last:.2f}%" in out
    assert "training" not in out
    assert snapshot(run) == before
    (run / ".checkpoint.pth.abc.tmp").unlink()


def test_other_config_is_refused_naming_the_keys(finished, capsys):
    config, run = finished
    before = snapshot(run)
    assert main_py(["-c", str(config), "--output_dir", str(run), "--lr", "0.01", "--act", "gelu",
                    "--num_workers", "0", "--print_freq", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {run} holds a run of another config (")
    assert "act: 'raa' -> 'gelu'" in err and "lr: 0.001 -> 0.01" in err and "print_freq" not in err
    assert "another output_dir" in err and "--overwrite True" in err
    assert main_py(["-c", str(config), "--output_dir", str(run), "--epochs", "1"]) == 1  # a run does not shrink
    assert "epochs: 2 -> 1" in capsys.readouterr().err
    assert snapshot(run) == before


def test_overwrite_replaces_the_run(finished, tmp_path, capsys):
    config, run = finished
    copy = tmp_path / "run"
    copy.mkdir()
    for path, (data, _) in snapshot(run).items():
        (copy / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(run)).write_bytes(data)
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--epochs", "1", "--overwrite", "True"]) == 0
    assert f"replacing the run in {copy}" in capsys.readouterr().out
    assert [r["epoch"] for r in strict_rows(copy)] == [0]
    assert not (copy / "checkpoint_0001.pth").exists()
    assert torch.load(copy / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert json.loads((copy / "config.json").read_text())["epochs"] == 1


def test_resume_at_or_past_epochs_says_so(finished, capsys):
    config, run = finished
    for epochs in ("2", "1"):
        assert main_py(["-c", str(config), "-r", str(run / "checkpoint.pth"), "--output_dir",
                        str(run.parent / f"elsewhere{epochs}"), "--epochs", epochs]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"error: checkpoint {run / 'checkpoint.pth'} has 2 finished epochs and epochs is {epochs}: "
                       f"nothing to train; give --epochs larger than 2 to train it on")


def test_resume_refuses_changed_keys(finished, tmp_path, capsys):
    config, run = finished
    assert main_py(["-c", str(config), "-r", str(run / "checkpoint_0000.pth"), "--output_dir", str(tmp_path / "r"),
                    "--lr", "1"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoint_0000.pth'} was trained with another config (lr: 0.001 -> 1)" in err


def test_more_epochs_follow_the_schedule_of_a_fresh_run_of_that_length(tmp_path, capsys):
    config = tmp_path / "tiny.py"
    config.write_text(TINY.replace("epochs = 2", "epochs = 1"))
    fresh, grown = tmp_path / "fresh", tmp_path / "grown"
    assert main_py(["-c", str(config), "--output_dir", str(fresh), "--epochs", "3"]) == 0
    assert main_py(["-c", str(config), "--output_dir", str(grown)]) == 0
    first = (grown / "log.txt").read_text()
    (grown / ".checkpoint.pth.x1y2.tmp").write_bytes(b"left by a killed process")
    capsys.readouterr()
    assert main_py(["-c", str(config), "--output_dir", str(grown), "--epochs", "3", "--print_freq", "4"]) == 0
    out = capsys.readouterr().out
    assert f"continuing the unfinished run in {grown} at epoch 1 of 3 from checkpoint.pth" in out
    assert "img/s, run ends in" in out  # the progress line off a terminal
    rows, reference = strict_rows(grown), strict_rows(fresh)
    assert (grown / "log.txt").read_text().startswith(first)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["lr"] == pytest.approx(1e-5)  # a 1-epoch run ends its schedule at min_lr
    assert rows[1]["lr"] == reference[1]["lr"] and rows[1]["lr"] > 2e-4  # the 3-epoch cosine at 2/3, not min_lr
    assert rows[2]["lr"] == reference[2]["lr"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert not (grown / ".checkpoint.pth.x1y2.tmp").exists()  # a killed process's temporary file, removed
    saved = json.loads((grown / "config.json").read_text())
    assert saved["epochs"] == 3
    assert saved["resumes"] == [{"epoch": 1, "checkpoint": str(grown / "checkpoint.pth"),
                                 "changed": {"epochs": [1, 3], "print_freq": [50, 4]}}]
    assert torch.load(grown / "checkpoint.pth", weights_only=True)["resumes"] == saved["resumes"]


def wait_for(predicate, proc, what):
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        time.sleep(0.02)


def test_killed_and_stopped_runs_continue_exactly(tmp_path, capsys, monkeypatch):
    """SIGKILL mid-run, the same command continues; SIGTERM ends it with one line; the same command again
    finishes with the weights of an uninterrupted run, the finished epochs' log lines untouched. Every process
    runs one intra-op thread (bits depend on the thread count), in this process as in the subprocesses."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.py"
    config.write_text(TINY.replace("epochs = 2", "epochs = 8"))
    run, reference = tmp_path / "run", tmp_path / "reference"
    command = [sys.executable, str(ROOT / "main.py"), "-c", str(config), "--output_dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    latest = run / "checkpoint.pth"

    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(latest.is_file, killed, "its first checkpoint")
    killed.kill()
    killed.wait()
    done = torch.load(latest, weights_only=True)["epoch"] + 1
    kept = rundir.log_lines(run, done)
    assert len(kept) == done < 8

    # a scheduler signals the whole process group: the data-loader worker too (num_workers may change on continuing)
    stopped = subprocess.Popen(command + ["--num_workers", "1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: torch.load(latest, weights_only=True)["epoch"] + 1 > done, stopped, "a new epoch")
    os.killpg(stopped.pid, signal.SIGTERM)
    out, err = stopped.communicate(timeout=120)
    assert f"continuing the unfinished run in {run} at epoch {done} of 8" in out
    state = torch.load(latest, weights_only=True)
    assert stopped.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM: {latest} holds the {state['epoch'] + 1} finished "
                                            f"epochs and is good; the same command continues the run")
    assert [r["epoch"] for r in strict_rows(run)] == list(range(state["epoch"] + 1))
    assert rundir.log_lines(run, done) == kept
    assert not list(run.glob(".*.tmp"))

    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 0
    assert main_py(["-c", str(config), "--output_dir", str(reference)]) == 0
    same_weights(torch.load(latest, weights_only=True), torch.load(reference / "checkpoint.pth", weights_only=True))
    assert rundir.log_lines(run, done) == kept
    assert [r["epoch"] for r in strict_rows(run)] == list(range(8))
    assert [r["test_acc1"] for r in strict_rows(run)] == [r["test_acc1"] for r in strict_rows(reference)]
    assert len(json.loads((run / "config.json").read_text())["resumes"]) == 2


def test_output_dir_that_is_a_file(finished, tmp_path, capsys):
    config, _ = finished
    (tmp_path / "file").write_text("")
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: output_dir {tmp_path / 'file'} is a file, not a folder; "
                                               f"choose another output_dir")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "config.json"
    rundir.write_json(path, {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert path.read_text() == '{\n  "a": null,\n  "b": [\n    null,\n    1.5\n  ]\n}\n'

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        rundir.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_batch_a_second_at_once(signum):
    from dnrt.tool.train import SignalStop, Stopped

    with SignalStop() as stop:
        stop.check()
        os.kill(os.getpid(), signum)
        written = ["checkpoint.pth"]  # still runs: the handler only notes the signal (no raise inside a write)
        with pytest.raises(Stopped) as stopped:
            stop.check()  # the training loop's next batch
        assert written and stopped.value.exit_code == 128 + signum
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # a second signal raises at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_unwritable_output_dir_names_it(finished, tmp_path, capsys, monkeypatch):
    config, _ = finished

    def refuse(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(rundir, "write_config", refuse)
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == f"error: cannot write to output_dir {tmp_path / 'run'}: Permission denied"
    ckpt = finished[1] / "checkpoint_0000.pth"
    assert main_py(["-c", str(config), "-r", str(ckpt), "--output_dir", str(tmp_path / "resumed")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: cannot write to output_dir {tmp_path / 'resumed'}: Permission "
                                               f"denied; {ckpt} (1 finished epoch) is untouched")


def test_graph_runs_share_the_run_folder_rules(tmp_path, capsys):
    pytest.importorskip("torch_geometric", reason="needs torch_geometric: pip install -e '.[graph]'")
    from dnrt.tool import graph
    from dnrt.tool.config import resolve

    cfg = resolve(dict(dataset="karate", model="sage", act="raa", criterion="arr", epochs=3, lr=0.01,
                       optimizer="adam", weight_decay=0.0, device="cpu", output_dir=str(tmp_path / "run"),
                       model_kwargs={"hidden": 8, "num_layers": 2, "dropout": 0.0}))
    summary = graph.train_graph(cfg)
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert graph.train_graph(cfg) == summary
    assert "holds a finished run of this config (3 epochs)" in capsys.readouterr().out
    assert snapshot(tmp_path / "run") == before
    with pytest.raises(DNRTError, match=r"holds a run of another config \(lr: 0.01 -> 0.1\)"):
        graph.train_graph({**cfg, "lr": 0.1})
    with pytest.raises(DNRTError, match=r"holds a run of another config \(epochs: 3 -> 5\)"):
        graph.train_graph({**cfg, "epochs": 5})  # graph runs keep no checkpoint: more epochs would start anew
    assert len(strict_rows(tmp_path / "run")) == 3


def test_a_damaged_checkpoint_in_the_folder_is_named(finished, tmp_path, capsys):
    config, _ = finished
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"not a checkpoint")
    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {run / 'checkpoint.pth'} is corrupt or not a dnrt checkpoint")
    assert err.endswith("; another output_dir, or --overwrite True to replace that run")
