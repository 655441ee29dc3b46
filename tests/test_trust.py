"""No non-finite state kept, errors from the world in one line, no host sync per step, `compile`, torchrun faults."""
import errno
import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import dnrt.tool.train as T
from dnrt.errors import DNRTError
from dnrt.tool import rundir
from dnrt.tool.cli import main, main_py
from tiny_config import TINY

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MLP = ["--dataset", "digits", "--image_size", "None", "--model", "mlp", "--model_kwargs", "{}", "--act", "gelu",
              "--criterion", "ce", "--lr", "3e-3"]


def strict_rows(run):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token} in log.txt")
    return [json.loads(line, parse_constant=refuse) for line in (run / "log.txt").read_text().splitlines()]


def all_finite(path):
    state = torch.load(path, weights_only=True)
    return all(torch.isfinite(v).all() for part in ("model", "arr") for v in (state[part] or {}).values()
               if v.is_floating_point())


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "tiny.py"
    config.write_text(TINY)
    assert main_py(["-c", str(config), "--output_dir", str(folder / "run")]) == 0
    return config, folder / "run"


def test_non_finite_loss_stops_before_any_bad_checkpoint(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main_py(["-c", str(config), "--output_dir", str(run), "--lr", "1e30"]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: non-finite loss at epoch 0, iteration \d+: that update was not applied and "
                        r"training stopped \(lower lr, set clip_max_norm, or check the data\); no epoch had "
                        rf"finished, so {re.escape(str(run))} holds no checkpoint", err), err
    assert not list(run.glob("*.pth")) and strict_rows(run) == []


@pytest.mark.parametrize("clip", [1.0, 0])
def test_non_finite_gradient_is_never_applied(config, tmp_path, capsys, monkeypatch, clip):
    """An infinite gradient at epoch 1, iteration 3 (hooked in): the weights stay those before that step."""
    built, before = [], {}
    build_model = T.build_model

    def poisoned(*args, **kwargs):
        model, arr = build_model(*args, **kwargs)
        weight = model.head.weight
        calls = []

        def hook(grad):
            calls.append(1)
            if len(calls) == 8 + 3 + 1:  # 8 iterations per epoch
                before.update({k: v.detach().clone() for k, v in model.state_dict().items()})
                return grad * float("inf")
            return grad
        weight.register_hook(hook)
        built.append(model)
        return model, arr

    monkeypatch.setattr(T, "build_model", poisoned)
    run = tmp_path / "run"
    assert main_py(["-c", str(config), "--output_dir", str(run), "--clip_max_norm", str(clip)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: non-finite gradient norm at epoch 1, iteration 3: that update was not applied and "
                   f"training stopped (lower lr, set clip_max_norm, or check the data); {run / 'checkpoint.pth'} "
                   f"holds the 1 finished epoch and is good")
    params = dict(built[0].named_parameters())
    assert all(torch.equal(params[k], before[k]) for k in params)  # that step and the rest of the epoch were undone
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 0 and all_finite(run / "checkpoint.pth")
    assert [r["epoch"] for r in strict_rows(run)] == [0]


def test_fp16_scaler_skips_are_counted_not_fatal():
    """GradScaler skips an overflowing step by design: train_one_epoch counts it and goes on."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    calls = []
    model.weight.register_hook(lambda g: g * float("inf") if calls.append(1) or len(calls) == 2 else g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    loader = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(4)]
    loss_fn = T.make_loss(model, None, nn.CrossEntropyLoss(), False)
    stats = T.train_one_epoch(model, None, loss_fn, optimizer, Schedule(), scaler,
                              lambda: torch.autocast("cpu", enabled=False), loader, torch.device("cpu"), 0,
                              {"clip_max_norm": 1.0, "print_freq": 50})
    assert stats["skipped_steps"] == 1 and torch.isfinite(model.weight).all()
    assert scaler.get_scale() == 2.0 ** 7  # backed off once


class Schedule:
    def step_update(self, num_updates):
        pass


def test_best_checkpoint_only_replaced_by_a_finite_better_evaluation(config, tmp_path, monkeypatch):
    evaluate = T.evaluate
    results = []

    def nan_loss_at_epoch_1(*args, **kwargs):
        metrics = evaluate(*args, **kwargs)
        results.append(metrics)
        if len(results) == 2:
            metrics = {**metrics, "loss": float("nan"), "acc1": 100.0}
        return metrics

    monkeypatch.setattr(T, "evaluate", nan_loss_at_epoch_1)
    run = tmp_path / "run"
    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 0
    rows = strict_rows(run)
    assert rows[1]["test_loss"] is None and rows[1]["test_acc1"] == 100.0
    best = torch.load(run / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0 and best["best_acc1"] == rows[0]["test_acc1"]


def test_non_finite_weights_are_never_saved(config, tmp_path, capsys, monkeypatch):
    """Weights that became non-finite by another way than an update (here set by hand after epoch 1's training)."""
    one_epoch = T.train_one_epoch

    def poison_epoch_1(model, *args, **kwargs):
        stats = one_epoch(model, *args, **kwargs)
        if args[8] == 1:
            with torch.no_grad():
                model.head.weight[0, 0] = float("nan")
        return stats

    monkeypatch.setattr(T, "train_one_epoch", poison_epoch_1)
    run = tmp_path / "run"
    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: the weights became non-finite in epoch 1 (head.weight); not "
                                               f"saved; {run / 'checkpoint.pth'} holds the 1 finished epoch and is "
                                               f"good")
    assert all(all_finite(path) for path in run.glob("*.pth"))
    assert torch.load(run / "checkpoint_best.pth", weights_only=True)["epoch"] == 0


def test_eval_of_a_non_finite_checkpoint_is_an_error(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    state["model"]["head.bias"][0] = float("nan")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    assert main(["eval", "-r", str(bad), "--output_dir", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint {bad} holds non-finite weights in 1 tensors (head.bias)"
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_checkpoint_of_another_model_lists_the_keys(tiny_run, capsys):
    config, run = tiny_run
    state = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    block1 = [k for k in state if k.startswith("blocks.1.")]
    argv = ["-c", str(config), "-r", str(run / "checkpoint.pth"), "--eval"]
    assert main_py(argv + ["--model_kwargs", '{"depth": 3, "embed_dim": 32, "num_heads": 2}']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {run / 'checkpoint.pth'} is of another model than VisionTransformer: "
                          f"keys {len(block1)} missing (blocks.2.")
    assert "unexpected" not in err and "shape" not in err
    assert main_py(argv + ["--model_kwargs", '{"depth": 1, "embed_dim": 48, "num_heads": 2}']) == 1
    err = capsys.readouterr().err.strip()
    assert f"{len(block1)} unexpected (blocks.1." in err
    assert re.search(r"; \d+ of another shape \(cls_token \[1, 1, 32\] vs \[1, 1, 48\], ", err), err


def write_images(folder, broken=None):
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            (folder / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * k + i, 0, 0)).save(folder / split / name / f"{i}.png")
    if broken:
        data = (folder / broken).read_bytes()
        (folder / broken).write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_the_run_naming_it(config, tmp_path, capsys, workers):
    data = tmp_path / "images"
    write_images(data, broken="train/dog/2.png")
    argv = ["-c", str(config), "--dataset", "folder", "--data_root", str(data), "--image_size", "8", "--no_aug",
            "True", "--model", "mlp", "--model_kwargs", "{}", "--criterion", "ce", "--num_workers", str(workers),
            "--batch_size", "4", "--output_dir", str(tmp_path / "run")]
    assert main_py(argv) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: cannot read image {re.escape(str(data / 'train/dog/2.png'))} \(\w+Error: .+\); "
                        r"replace or remove the file", err), err
    assert not multiprocessing.active_children()  # no worker outlives the run (they would block the exit)


@pytest.mark.parametrize("broken, workers", [("val/cat/1.gif", 0), ("train/dog/3.jpg", 1)])
def test_a_truncated_image_stops_the_run_naming_it(config, tmp_path, capsys, broken, workers):
    """Every format Pillow reads is used (a GIF too, which torchvision's ImageFolder would skip), so a damaged one
    is named rather than silently left out."""
    data = tmp_path / "images"
    write_images(data)
    Image.new("RGB", (64, 64), (9, 99, 199)).save(data / broken)
    damaged = (data / broken).read_bytes()
    (data / broken).write_bytes(damaged[:len(damaged) // 2])
    argv = ["-c", str(config), "--dataset", "folder", "--data_root", str(data), "--image_size", "8", "--no_aug",
            "True", "--model", "mlp", "--model_kwargs", "{}", "--act", "gelu", "--criterion", "ce", "--num_workers",
            str(workers), "--batch_size", "4", "--output_dir", str(tmp_path / "run")]
    assert main_py(argv) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: cannot read image {re.escape(str(data / broken))} \(\w+Error: .+\); "
                        r"replace or remove the file", err), err


def test_data_root_that_is_a_file(config, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main_py(["-c", str(config), "--dataset", "folder", "--data_root", str(tmp_path / "file"),
                    "--output_dir", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: data_root {tmp_path / 'file'} is a file, not a folder; "
                                               f"give the folder that holds the dataset")


def mount_tmpfs(folder, size):
    """A tmpfs of `size` bytes at folder (root only); False where it cannot be mounted."""
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return proc.returncode == 0


def test_full_disk_names_the_file_and_the_good_checkpoint(config, tmp_path, capsys, monkeypatch):
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "probe"), "--epochs", "1"]) == 0
    size = (tmp_path / "probe" / "checkpoint.pth").stat().st_size
    run = tmp_path / "disk"
    mounted = mount_tmpfs(run, 3 * size + size // 2)  # room for epoch 0's three checkpoints, not for epoch 1's
    if not mounted:  # no tmpfs here: the fourth checkpoint write fails as a full disk does
        writes = []
        write = rundir.atomic_write

        def full(path, data):
            writes.append(path) if Path(path).suffix == ".pth" else None
            if len(writes) > 3 and Path(path).suffix == ".pth":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write(path, data)
        monkeypatch.setattr("dnrt.tool.rundir.checkpoint.atomic_write", full)
    try:
        capsys.readouterr()
        assert main_py(["-c", str(config), "--output_dir", str(run)]) == 1
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"error: cannot write {re.escape(str(run))}/checkpoint_(best|0001)\.pth: No space left "
                            rf"on device; {re.escape(str(run / 'checkpoint.pth'))} holds the 1 finished epoch and is "
                            r"good", err), err
        assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 0
        assert not list(run.glob(".*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(run)], check=True)


def count_syncs(monkeypatch):
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    return calls


@pytest.mark.parametrize("batches,print_freq", [(2, 100), (6, 100), (6, 2)])
def test_no_host_sync_per_step(monkeypatch, batches, print_freq, request):
    """Tensor reads happen at the read points only: once per print_freq iterations and at the epoch's end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(batches)]
    loss_fn = T.make_loss(model, None, nn.CrossEntropyLoss(), False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    calls = count_syncs(monkeypatch)
    stats = T.train_one_epoch(model, None, loss_fn, optimizer, Schedule(), scaler,
                              lambda: torch.autocast("cpu", enabled=False), loader, torch.device("cpu"), 0,
                              {"clip_max_norm": 1.0, "print_freq": print_freq})
    monkeypatch.undo()
    reads = (batches - 1) // print_freq + 1  # the print_freq points before the end, and the end
    assert calls == ["tolist"] * (reads + 1)  # + the epoch's reduction over processes
    assert stats["images_per_s"] > 0 and stats["train_loss"] == pytest.approx(stats["train_ce"])


def test_compile_key_compiles_the_loss(tmp_path, monkeypatch, capsys):
    """compile=True goes through torch.compile (here with the aot_eager backend, which traces the same graph without
    code generation) and gives the eager run's first-epoch loss."""
    modes = []
    compile_ = torch.compile

    def traced(fn, mode=None):
        modes.append(mode)
        return compile_(fn, backend="aot_eager")

    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    argv = ["-c", str(config), "--epochs", "1", *DIGITS_MLP]
    assert main_py(argv + ["--output_dir", str(tmp_path / "eager")]) == 0
    monkeypatch.setattr(torch, "compile", traced)
    assert main_py(argv + ["--output_dir", str(tmp_path / "compiled"), "--compile", "True"]) == 0
    assert modes == [None]
    eager, compiled = strict_rows(tmp_path / "eager")[0], strict_rows(tmp_path / "compiled")[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-5)
    T.make_loss(nn.Linear(2, 2), None, nn.CrossEntropyLoss(), "max-autotune")
    assert modes == [None, "max-autotune"]
    with pytest.raises(DNRTError, match="compile must be False, True or a torch.compile mode"):
        T.make_loss(nn.Linear(2, 2), None, nn.CrossEntropyLoss(), "fast")


KILL_SCRIPT = """
import os, signal, sys
import dnrt.tool.train as train
one_epoch = train.train_one_epoch
def train_one_epoch(*args, **kwargs):
    if (os.environ["RANK"] == "1" and args[9] == int(os.environ["KILL_AT_EPOCH"])
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)
    return one_epoch(*args, **kwargs)
train.train_one_epoch = train_one_epoch
from dnrt.tool.cli import main_py
sys.exit(main_py(sys.argv[1:]))
"""


def test_torchrun_killed_worker_ends_the_job_and_a_restart_continues(tmp_path):
    """SIGKILL of one of two Gloo workers ends the job (no hang); with --max-restarts 1 the restarted workers continue
    the run from its last checkpoint through the same-command path."""
    (tmp_path / "tiny.py").write_text(TINY.replace("epochs = 2", "epochs = 3"))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    run = tmp_path / "run"

    def torchrun(kill_at, *options):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT_EPOCH": str(kill_at)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *options,
               str(tmp_path / "kill.py"), "-c", str(tmp_path / "tiny.py"), "--output_dir", str(run)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    ended = torchrun(1)
    assert ended.returncode != 0
    assert [r["epoch"] for r in strict_rows(run)] == [0]
    first = rundir.log_lines(run, 1)
    restarted = torchrun(2, "--max-restarts", "1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"continuing the unfinished run in {run} at epoch 1 of 3" in restarted.stdout
    assert f"continuing the unfinished run in {run} at epoch 2 of 3" in restarted.stdout  # after the restart
    assert [r["epoch"] for r in strict_rows(run)] == [0, 1, 2] and rundir.log_lines(run, 1) == first
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 2
