"""The run folder's edges: one owner (the lock), what --overwrite may remove (the manifest), damaged logs, where
eval.json goes, file modes under the umask, and the one-line messages of what users type."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dnrt.errors import DNRTError
from dnrt.tool import launch, rundir
from dnrt.tool.cli import main, main_py

ROOT = Path(__file__).resolve().parents[1]
FAST = """
dataset = "digits"
image_size = None
model = "mlp"
model_kwargs = {}
act = "gelu"
criterion = "ce"
lr = 3e-3
epochs = 2
batch_size = 64
num_workers = 0
device = "cpu"
amp = False
save_interval = 1
"""
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def snapshot(folder):
    """Every file below `folder` (but dnrt.lock, which each process taking the folder rewrites) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def copy_of(run, to):
    shutil.copytree(run, to)
    return to


def epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()]


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """(config file, finished 2-epoch run folder), trained under umask 022."""
    folder = tmp_path_factory.mktemp("fast")
    config, run = folder / "fast.py", folder / "run"
    config.write_text(FAST)
    old = os.umask(0o022)
    try:
        assert main_py(["-c", str(config), "--output_dir", str(run)]) == 0
    finally:
        os.umask(old)
    return config, run


# one owner per run folder


def test_a_held_folder_is_refused_naming_the_holder(fast, tmp_path, capsys):
    config, _ = fast
    run = tmp_path / "run"
    with rundir.owned(run):
        assert main_py(["-c", str(config), "--output_dir", str(run)]) == 1
        err = one_line(capsys)
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"error: {re.escape(str(run))} is in use by another run \(host {host}, PID {os.getpid()}, "
                        r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+\); wait for it to end, or choose another "
                        r"output_dir", err), err
    assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK]  # nothing else written


@pytest.mark.parametrize("second", [["--lr", "0.01"], []], ids=["other_lr", "same_command"])
def test_a_second_run_into_a_running_folder_is_refused_and_the_first_log_stays_whole(fast, tmp_path, capsys,
                                                                                        second):
    """The first run is paused (SIGSTOP: it keeps its lock) while the second starts; the second is refused in one
    line naming the first; the first then finishes with one log line per epoch."""
    config, _ = fast
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "-c", str(config), "--output_dir", str(run),
                              "--epochs", "4"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (run / "checkpoint.pth").is_file():
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        capsys.readouterr()
        assert main_py(["-c", str(config), "--output_dir", str(run), "--epochs", "4", *second]) == 1
        err = one_line(capsys)
        assert err.startswith(f"error: {run} is in use by another run (host {socket.gethostname()}, PID {first.pid}, ")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert epochs(run) == [0, 1, 2, 3]
    assert json.loads((run / "config.json").read_text())["lr"] == 3e-3
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == first.pid


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dnrt.tool import rundir; "
                               "lock = rundir.RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DNRTError, match=f"PID {holder.pid}"):
            rundir.RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = rundir.RunLock(run).acquire()  # the kernel dropped the dead process's lock; its file stays
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    """Data-loader workers are forked while the run holds its lock: the lock ends with the run, not with them."""
    lock = rundir.RunLock(tmp_path).acquire()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the fork hooks have run when fork returns here
        os.write(write, b"1")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(read, 1) == b"1"
        lock.release()
        rundir.RunLock(tmp_path).acquire().release()  # while the child lives
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read)
        os.close(write)


def test_read_only_commands_take_no_lock(fast, tmp_path, capsys):
    config, run = fast
    copy = copy_of(run, tmp_path / "copy")
    with rundir.owned(copy):  # a run going on in the folder
        assert main(["compare", str(copy)]) == 0
        assert main(["eval", "-r", str(copy / "checkpoint.pth")]) == 0
    assert (copy / "compare.md").is_file() and (copy / "eval.json").is_file()


# --overwrite removes only what dnrt wrote


def test_overwrite_refuses_a_folder_with_foreign_files_and_deletes_nothing(fast, tmp_path, capsys):
    config, run = fast
    copy = copy_of(run, tmp_path / "copy")
    (copy / "checkpoint_mine.pth").write_bytes(b"another program's")
    (copy / "tensorboard" / "events.out.tfevents.other").write_bytes(b"another writer's")
    before = snapshot(copy)
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--lr", "0.01", "--overwrite", "True"]) == 1
    assert one_line(capsys) == (f"error: --overwrite True removes only what dnrt wrote, and {copy} also holds "
                                f"checkpoint_mine.pth, tensorboard/events.out.tfevents.other; move those away, or "
                                f"choose another output_dir")
    assert snapshot(copy) == before

    (copy / "checkpoint_mine.pth").unlink()
    (copy / "tensorboard" / "events.out.tfevents.other").unlink()
    assert main(["eval", "-r", str(copy)]) == 0  # eval.json: an output of dnrt's, removable too
    launch.write_record(copy, launcher="local", state="finished")  # the launcher's job record: dnrt's too
    capsys.readouterr()
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--lr", "0.01", "--epochs", "1",
                    "--overwrite", "True"]) == 0
    assert f"replacing the run in {copy}" in capsys.readouterr().out
    assert not (copy / "eval.json").exists() and not (copy / "checkpoint_0001.pth").exists()
    assert not (copy / "job.json").exists()
    assert epochs(copy) == [0] and json.loads((copy / "config.json").read_text())["lr"] == 0.01
    listed = json.loads((copy / "manifest.json").read_text())["files"]
    assert sorted(p for p in snapshot(copy) if p != "manifest.json") == listed


def test_a_foreign_config_json_is_never_a_dnrt_run(fast, tmp_path, capsys):
    config, _ = fast
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "config.json").write_text('{"learning_rate": 0.1, "model": "theirs"}')
    (run / "checkpoint_mine.pth").write_bytes(b"theirs")
    before = snapshot(run)
    for extra in ([], ["--overwrite", "True"]):
        assert main_py(["-c", str(config), "--output_dir", str(run), *extra]) == 1
        assert one_line(capsys) == (f"error: {run / 'config.json'} was not written by dnrt: {run} is not a dnrt run "
                                    f"folder and dnrt changes nothing in it; choose another output_dir")
    assert snapshot(run) == before


def test_a_run_from_before_the_manifest_overwrites_its_known_files_only(fast, tmp_path, capsys):
    config, run = fast
    copy = copy_of(run, tmp_path / "old")
    (copy / "manifest.json").unlink()
    (copy / "notes.txt").write_text("mine")
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--lr", "0.01", "--overwrite", "True"]) == 1
    assert one_line(capsys).endswith(f"{copy} also holds notes.txt; move those away, or choose another output_dir")
    (copy / "notes.txt").unlink()
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--lr", "0.01", "--epochs", "1",
                    "--overwrite", "True"]) == 0
    assert epochs(copy) == [0] and not (copy / "checkpoint_0001.pth").exists()


# damaged logs: one line, nothing written


@pytest.mark.parametrize("damage", ["empty", "torn"])
def test_a_damaged_log_is_one_line_before_anything_is_written(fast, tmp_path, capsys, damage):
    config, run = fast
    copy = copy_of(run, tmp_path / "copy")
    log = copy / "log.txt"
    log.write_text("" if damage == "empty" else log.read_text() + '{"epoch": 2, "lr": 0.0')
    before = snapshot(copy)
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--epochs", "3"]) == 1
    err = one_line(capsys)
    what = (f"{log} holds no epochs while {copy / 'checkpoint.pth'} says 2 epochs ran" if damage == "empty" else
            f"{log}:3: not a JSON line (")
    assert err.startswith(f"error: {what}"), err
    assert err.endswith(f"the log cannot be trusted; move it aside (mv {log} {log}.damaged) and give the same command "
                        f"again: the run continues from {copy / 'checkpoint.pth'}, its log restarting at epoch 2")
    assert snapshot(copy) == before  # config.json's resumes untouched

    log.rename(copy / "log.txt.damaged")
    assert main_py(["-c", str(config), "--output_dir", str(copy), "--epochs", "3"]) == 0
    assert f"{log} is missing: the log goes on from epoch 2" in capsys.readouterr().out
    assert epochs(copy) == [2] and (copy / "log.txt.damaged").is_file()


# where eval.json goes


def test_eval_of_a_copied_run_writes_into_the_copy(fast, tmp_path, capsys):
    config, run = fast
    copy = copy_of(run, tmp_path / "copy")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["eval", "-r", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"-r {copy} is a run folder: using its best checkpoint, {copy / 'checkpoint_best.pth'}" in out
    assert json.loads((copy / "eval.json").read_text())["checkpoint"] == str(copy / "checkpoint_best.pth")
    assert snapshot(run) == before and not (run / "eval.json").exists()
    assert main(["eval", "-r", str(copy / "checkpoint_0000.pth"), "--out", str(tmp_path / "e0.json")]) == 0
    assert json.loads((tmp_path / "e0.json").read_text())["epoch"] == 0
    assert main(["eval", "-r", str(copy), "--output_dir", str(tmp_path / "evals v1.2")]) == 0  # a folder
    assert (tmp_path / "evals v1.2" / "eval.json").is_file()


# modes under the umask


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rundir.write_json(tmp_path / "a.json", {})
        rundir.save_checkpoint({"model": {}}, tmp_path / "c.pth")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "c.pth")] == [mode, mode]


def test_a_runs_files_are_0644_under_umask_022(fast):
    _, run = fast
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "log.txt", "checkpoint.pth", "manifest.json", "dnrt.lock"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


# messages for what users type


def test_resume_from_a_run_folder_says_which_checkpoint(fast, tmp_path, capsys):
    config, run = fast
    out = tmp_path / "more"
    assert main_py(["-c", str(config), "-r", str(run), "--epochs", "3", "--output_dir", str(out)]) == 0
    assert f"-r {run} is a run folder: using its latest checkpoint, {run / 'checkpoint.pth'}" in capsys.readouterr().out
    assert epochs(out) == [2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "-r", str(empty)]) == 1
    assert one_line(capsys) == (f"error: -r {empty} is a folder without checkpoint_best.pth: give -r a checkpoint "
                                f"file, or the folder of a run of `dnrt train`")


def test_eval_without_r_and_c_of_a_folder(tmp_path, capsys):
    assert main(["eval"]) == 1
    need = "error: dnrt eval needs -r: a checkpoint file, or a run folder (its checkpoint_best.pth is evaluated)"
    assert one_line(capsys) == need
    (tmp_path / "c.py").write_text(FAST)
    assert main(["eval", "-c", str(tmp_path / "c.py")]) == 1
    assert one_line(capsys) == need
    assert main(["train", "-c", str(tmp_path)]) == 1
    assert one_line(capsys).startswith(f"error: config {tmp_path} is a folder, not a config file; give -c a .py file")


class Pickled:
    pass


def test_a_pickle_is_named_not_a_weights_only_file(fast, tmp_path, capsys):
    config, _ = fast
    pickle = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Pickled()}, pickle)
    assert main_py(["-c", str(config), "--pretrained_file", str(pickle), "--output_dir", str(tmp_path / "r")]) == 1
    err = one_line(capsys)
    assert err == (f"error: pretrained_file {pickle} is not a weights-only file: it holds pickled Python objects, "
                   f"which dnrt does not load (they can run code); save its state_dict with torch.save, or give a "
                   f"checkpoint of `dnrt train`")
    assert main(["eval", "-r", str(pickle)]) == 1
    assert one_line(capsys).startswith(f"error: checkpoint {pickle} is not a weights-only file: it holds pickled")
    assert not (tmp_path / "r" / "config.json").exists()


def test_nan_in_a_pretrained_file_is_the_files_fault(fast, tmp_path, capsys):
    config, run = fast
    state = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert main_py(["-c", str(config), "--pretrained_file", str(tmp_path / "nan.pth"),
                    "--output_dir", str(tmp_path / "r")]) == 1
    assert one_line(capsys) == (f"error: pretrained_file {tmp_path / 'nan.pth'} holds NaN or infinite values in 1 "
                                f"tensors ({name}): the file is damaged; training from it cannot work")
    assert not (tmp_path / "r" / "config.json").exists()


def read_only(monkeypatch):
    """Writes into any folder fail as on a read-only mount (root ignores chmod, so the file system is simulated)."""
    def refuse(*args, dir=None, **kwargs):
        raise OSError(30, "Read-only file system", str(Path(dir) / ".x.tmp"))
    monkeypatch.setattr(rundir.files.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("command,written", [(["compare"], "compare.md"), (["plot", "curves"], "curves.png")])
def test_a_read_only_run_folder_is_one_line(fast, monkeypatch, capsys, command, written):
    _, run = fast
    read_only(monkeypatch)
    assert main([*command, str(run)]) == 1
    assert one_line(capsys) == f"error: cannot write {run / written}: Read-only file system; choose a writable --out"


def test_export_into_a_read_only_folder_is_one_line(fast, monkeypatch, capsys):
    _, run = fast
    read_only(monkeypatch)
    assert main(["export", "-r", str(run / "checkpoint.pth"), "--format", "torchscript"]) == 1
    assert one_line(capsys) == (f"error: cannot write {run / 'checkpoint.pt'}: Read-only file system; choose a "
                                f"writable --out")


@pytest.mark.parametrize("name", ["figures v1.2/", "existing.d"])
def test_out_naming_a_folder_writes_into_it(fast, tmp_path, capsys, name):
    _, run = fast
    out = tmp_path / name
    if not name.endswith("/"):
        out.mkdir()
    assert main(["plot", "curves", str(run), "--out", str(out) + ("/" if name.endswith("/") else "")]) == 0
    assert main(["compare", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "curves.csv", "curves.png"]


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_at_startup_is_one_line_and_130(fast, tmp_path, delay):
    """Ctrl-C while torch and the tool load (the first seconds of main.py) ends like one later on."""
    config, _ = fast
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "-c", str(config), "--output_dir",
                             str(tmp_path / "run"), "--epochs", "500"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err == "interrupted" or re.fullmatch(r"stopped by SIGINT: .*; the same command continues the run", err), err


def test_eval_on_a_dataset_unlike_the_training_one_is_one_line(fast, tmp_path, capsys):
    """A digits checkpoint (1 channel, 8×8) evaluated on 3-channel 32×32 images: one line naming both, no shape
    error from inside the model, and nothing written."""
    config, run = fast
    copy = copy_of(run, tmp_path / "copy")
    before = snapshot(copy)
    capsys.readouterr()
    assert main(["eval", "-r", str(copy / "checkpoint.pth"), "--dataset", "fake"]) == 1
    assert one_line(capsys) == (f"error: checkpoint {copy / 'checkpoint.pth'} was trained for in_chans=1, "
                                f"img_size=8, but dataset fake has in_chans=3, img_size=32; evaluate it on a "
                                f"dataset like the one it was trained on")
    assert snapshot(copy) == before
