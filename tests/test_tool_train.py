"""End-to-end runs of the training tool in this process: train, resume, evaluate with ARR."""
import json
import shutil

import pytest
import torch

from dnrt.tool.checkpoint import load_run
from dnrt.tool.cli import main, main_py
from tiny_config import TINY, train_tiny



def read_log(run):
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-epoch RAA+ARR run on fake data; returns (config file, run directory)."""
    return train_tiny(tmp_path_factory.mktemp("tiny"))


def test_run_directory(tiny):
    _, run = tiny
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "log.txt", "checkpoint.pth", "checkpoint_best.pth", "checkpoint_0000.pth",
            "checkpoint_0001.pth", "tensorboard"} <= names
    log = read_log(run)
    assert [row["epoch"] for row in log] == [0, 1]
    keys = {"epoch", "lr", "train_loss", "train_ce", "train_arr", "test_loss", "test_acc1", "test_acc5",
            "epoch_time", "n_parameters"}
    assert all(keys <= set(row) for row in log)
    assert all(row["train_loss"] == pytest.approx(row["train_ce"] + row["train_arr"]) for row in log)
    assert all(row["train_arr"] > 0 for row in log)
    saved = json.loads((run / "config.json").read_text())
    assert saved["act"] == "raa"
    assert saved["converted_activations"]["total"] == 2 and saved["converted_activations"]["replaced"] == {"GELU": 2}
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and state["config"]["criterion"] == "arr"
    assert state["best_acc1"] == max(row["test_acc1"] for row in log)
    counts = [v for k, v in state["arr"].items() if k.endswith("count")]
    assert counts and all(int(c.sum()) == 2 * 256 for c in counts)  # the memory saw 2 epochs of 256 images
    assert log[-1]["test_acc1"] > 20.0  # fake data is learnable: above the 10 % of chance


def test_resume_reaches_same_weights(tiny, tmp_path):
    config, run = tiny
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)  # resume in place from epoch 0: the log keeps epoch 0 and gets epoch 1 again
    assert main_py(["-c", str(config), "-r", str(resumed / "checkpoint_0000.pth"), "--output_dir", str(resumed)]) == 0
    full = torch.load(run / "checkpoint_0001.pth", weights_only=True)
    again = torch.load(resumed / "checkpoint_0001.pth", weights_only=True)
    for part in ("model", "arr"):
        assert full[part].keys() == again[part].keys()
        for key in full[part]:
            assert torch.equal(full[part][key], again[part][key]), f"{part}.{key} differs after resume"
    old, new = read_log(run), read_log(resumed)
    assert [row["epoch"] for row in new] == [0, 1]
    assert new[0] == old[0] and new[1]["test_acc1"] == old[1]["test_acc1"]


def test_eval_with_arr_loads_memory(tiny, tmp_path, capsys):
    config, run = tiny
    out = tmp_path / "eval"
    assert main_py(["-c", str(config), "-r", str(run / "checkpoint.pth"), "--eval", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    last = read_log(run)[-1]
    assert metrics["acc1"] == pytest.approx(last["test_acc1"])
    assert metrics["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert metrics["arr_loss"] > 0  # responses compared with the restored memory (an empty memory gives 0)
    assert {"acc5", "precision", "recall", "f1"} <= set(metrics) and len(metrics["per_class_acc1"]) == 10
    assert metrics["recall"] == pytest.approx(sum(metrics["per_class_acc1"].values()) / 10)
    printed = capsys.readouterr().out
    assert f"acc1: {metrics['acc1']:.4f}" in printed and "eval.json" in printed


def test_digits_two_epochs_gelu_mlp(tmp_path):
    config = tmp_path / "digits.py"
    config.write_text(TINY.replace('"fake"', '"digits"').replace("image_size = 8", "image_size = None"))
    run = tmp_path / "run"
    argv = ["-c", str(config), "--model", "mlp", "--model_kwargs", "{}", "--act", "gelu", "--criterion", "ce",
            "--lr", "3e-3", "--output_dir", str(run)]
    assert main_py(argv) == 0
    log = read_log(run)
    assert len(log) == 2 and all(row["train_arr"] == 0.0 for row in log)
    assert log[-1]["test_acc1"] > 60.0
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["arr"] is None and state["model_args"] == {"num_classes": 10, "in_chans": 1, "img_size": 8}


def test_dnrt_eval_uses_config_saved_in_checkpoint(tiny, tmp_path):
    _, run = tiny
    out = tmp_path / "eval"
    assert main(["eval", "-r", str(run / "checkpoint_best.pth"), "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["acc1"] == pytest.approx(max(row["test_acc1"] for row in read_log(run)))


def test_load_run_rebuilds_model_and_memory(tiny):
    _, run = tiny
    model, arr, cfg = load_run(run / "checkpoint.pth")
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert cfg["act"] == "raa" and not model.training
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, state["arr"][k]) for k, v in arr.state_dict().items())
    model(torch.zeros(2, 3, 8, 8))
    assert set(arr.responses) == set(arr.layers)  # the hooks are live for `dnrt plot responses`


def test_bf16_autocast_trains_raa_and_arr_on_the_cpu(tiny, tmp_path):
    """amp='bf16' runs RAA's kernels and ARR under CPU autocast: finite, close to the float32 run, not equal to it
    (so the autocast really ran), the memory kept in float32."""
    config, run = tiny
    bf16 = tmp_path / "bf16"
    assert main_py(["-c", str(config), "--output_dir", str(bf16), "--amp", "bf16"]) == 0
    fp32, low = read_log(run), read_log(bf16)
    for a, b in zip(fp32, low):
        assert a["train_loss"] != b["train_loss"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
    state = torch.load(bf16 / "checkpoint.pth", weights_only=True)
    assert state["arr"]["memory.mean"].dtype == torch.float32
