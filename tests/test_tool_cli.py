"""The command line as a user runs it: main.py in a subprocess, `dnrt` dispatch, and two Gloo processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnrt.tool.cli import main
from tiny_config import TINY

ROOT = Path(__file__).resolve().parents[1]

# run under torch.distributed.run: a normal main.py run, then every rank dumps its final model and ARR memory
RANK_SCRIPT = """
import os, sys, torch
import dnrt.tool.train as train
built = []
build_model = train.build_model
train.build_model = lambda *a, **k: built.append(build_model(*a, **k)) or built[-1]
from dnrt.tool.cli import main_py
code = main_py(sys.argv[1:])
model, arr = built[0]
torch.save({"model": model.state_dict(), "arr": arr.state_dict()}, f"{sys.argv[-1]}.rank{os.environ['RANK']}.pth")
sys.exit(code)
"""


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """Three failing main.py runs started together (each pays the import of torch): name -> CompletedProcess-like."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "tiny.py"
    config.write_text(TINY)
    (folder / "empty").mkdir()
    (folder / "bad.pth").write_bytes(b"this is not a checkpoint")
    commands = {
        "unknown_key": ["-c", str(config), "--epoch", "2"],
        "missing_dataset": ["-c", str(config), "--dataset", "cifar10", "--data_root", str(folder / "empty"),
                            "--output_dir", str(folder / "never")],
        "corrupt_checkpoint": ["-c", str(config), "-r", str(folder / "bad.pth"), "--eval"],
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=folder, env=env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return folder, results


def test_unknown_key_exits_1_naming_closest(failures):
    code, _, err = failures[1]["unknown_key"]
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "error: unknown config key 'epoch' in the command line (did you mean epochs?)"


def test_missing_dataset_names_archive(failures):
    folder, results = failures
    code, _, err = results["missing_dataset"]
    assert code == 1 and "Traceback" not in err
    assert f"put cifar-10-python.tar.gz into {folder / 'empty'}" in err
    assert not (folder / "never").exists()  # nothing written for a run that could not start


def test_corrupt_checkpoint(failures):
    folder, results = failures
    code, _, err = results["corrupt_checkpoint"]
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: checkpoint {folder / 'bad.pth'} is corrupt")


def test_dnrt_dispatch_errors(tmp_path, capsys, monkeypatch):
    assert main(["eval"]) == 1
    assert "dnrt eval needs -r" in capsys.readouterr().err
    assert main(["train"]) == 1
    assert "give a config with -c CONFIG" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "dnrt.tool.plots", None)  # an import of it now fails
    assert main(["plot", "curves"]) == 1
    assert capsys.readouterr().err.startswith("error: `dnrt plot` is unavailable")


def test_two_gloo_processes_agree(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           "-c", str(config), "--output_dir", str(run)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0, 1]  # one process writes the log
    ranks = [torch.load(f"{run}.rank{r}.pth", weights_only=True) for r in (0, 1)]
    saved = torch.load(run / "checkpoint.pth", weights_only=True)
    for part in ("model", "arr"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), f"{part}.{key} differs between ranks"
            assert torch.equal(value, saved[part][key])
    counts = [v for k, v in ranks[0]["arr"].items() if k.endswith("count")]
    # 256 fake training images, split over 2 ranks, for 2 epochs: each memory saw every sample of both ranks
    assert counts and all(int(c.sum()) == 512 for c in counts)


def test_output_into_a_closed_pipe_ends_quietly():
    reader = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    writer = subprocess.run(
        [sys.executable, "-c", "import sys; from dnrt.tool.cli import main; sys.exit(main(sys.argv[1:]))",
         "reproduce", "table1", "--dry-run"],
        stdout=reader.stdin, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
    )
    reader.stdin.close()
    reader.wait()
    assert writer.returncode == 0
    assert "Traceback" not in writer.stderr
