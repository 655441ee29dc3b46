"""`dnrt plot curves|responses`, `dnrt compare`, `dnrt profile` on runs trained in the test itself."""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from dnrt import RAA, DNRTError
from dnrt.tool import compare, plots, profile
from dnrt.tool.config import resolve
from dnrt.tool.train import train

TINY = dict(dataset="digits", epochs=2, batch_size=128, lr=2e-3, warmup_epochs=0, amp=False, device="cpu",
            num_workers=0, save_interval=100, print_freq=1000, seed=0)


def _train(root: Path, name: str, **settings) -> Path:
    """A real 2-epoch run on scikit-learn's digits, written by the training tool."""
    out = root / name
    train(resolve({**TINY, "output_dir": str(out), **settings}, name))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny runs: an MLP with GELU, the same with RAA + ARR, and a 2-block ViT with RAA."""
    root = tmp_path_factory.mktemp("runs")
    mlp = dict(model="mlp", model_kwargs={"hidden": 32, "depth": 3})
    vit = dict(model="vit_tiny_patch4_32", image_size=8, epochs=1,
               model_kwargs={"depth": 2, "embed_dim": 16, "num_heads": 2, "drop_path_rate": 0.0})
    return {"gelu": _train(root, "gelu", **mlp),
            "dnrt": _train(root, "dnrt", act="raa", criterion="arr", arr_loss_coef=10.0, **mlp),
            "vit": _train(root, "vit", act="raa", **vit)}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines() if line.strip()]


def _check_png(path: Path, width: int, height: int) -> None:
    """The PNG exists, has the expected pixel size and is not a single colour."""
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10


def _cli(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


# --- compare -------------------------------------------------------------------------------------------------------

def test_compare_table_equals_the_logs(runs, tmp_path, capsys):
    assert _cli(compare, [str(runs["gelu"]), str(runs["dnrt"]), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert table in capsys.readouterr().out
    rows = [line.strip("|").split(" | ") for line in table.splitlines()[2:]]
    base_best = max(e["test_acc1"] for e in _log(runs["gelu"]))
    for row, run, act, weight in zip(rows, (runs["gelu"], runs["dnrt"]), ("own", "raa"), ("-", "10")):
        log = _log(run)
        best = max(e["test_acc1"] for e in log)
        assert [c.strip() for c in row] == [
            str(run), "mlp", act, weight, str(len(log)), f"{best:.2f}", f"{log[-1]['test_acc1']:.2f}",
            f"{sum(e['epoch_time'] for e in log):.1f}", f"{best - base_best:+.2f}"]
    numbers = json.loads((tmp_path / "compare.json").read_text())
    assert numbers[1]["wall_time_s"] == pytest.approx(sum(e["epoch_time"] for e in _log(runs["dnrt"])))


def test_compare_reads_the_last_line_of_a_repeated_epoch(tmp_path):
    lines = [{"epoch": 0, "test_acc1": 10.0, "epoch_time": 1.0}, {"epoch": 0, "test_acc1": 30.0, "epoch_time": 2.0}]
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = compare.summarize_run(tmp_path)
    assert (row["epochs"], row["best_acc1"], row["wall_time_s"]) == (1, 30.0, 2.0)


def test_epochs_without_evaluation_are_skipped(tmp_path):
    """With eval_interval 2 the tool logs test keys every other epoch; curves leave the gaps empty."""
    lines = [{"epoch": e, "lr": 0.1, "train_ce": 2.0 - e, "epoch_time": 1.0} for e in range(3)]
    for e in (1, 2):
        lines[e].update(test_loss=1.5 - e / 10, test_acc1=40.0 + e)
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = compare.summarize_run(tmp_path)
    assert (row["epochs"], row["best_acc1"], row["last_acc1"]) == (3, 42.0, 42.0)
    path = plots.plot_curves([tmp_path])
    with path.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["test_acc1"] for r in rows] == ["", "41.0", "42.0"]
    assert [float(r["train_ce"]) for r in rows] == [2.0, 1.0, 0.0]
    (tmp_path / "log.txt").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(DNRTError, match="no epoch evaluated yet"):
        compare.compare_runs([tmp_path])


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "run directory not found"),
    (lambda d: d.mkdir(), "no log.txt in"),
    (lambda d: (d.mkdir(), (d / "log.txt").write_text("{oops\n")), "log.txt:1: not a JSON line"),
    (lambda d: (d.mkdir(), (d / "log.txt").write_text("\n")), "holds no epochs yet"),
])
def test_bad_run_directories_are_one_line_errors(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(DNRTError, match=message):
        compare.compare_runs([run])
    with pytest.raises(DNRTError, match=message):
        plots.plot_curves([run])


# --- curves --------------------------------------------------------------------------------------------------------

def test_curves_png_and_csv_equal_the_logs(runs, capsys):
    assert _cli(plots, ["curves", str(runs["gelu"]), str(runs["dnrt"])]) == 0
    path = runs["gelu"] / "curves.png"
    assert f"written: {path}" in capsys.readouterr().out
    _check_png(path, 1000, 750)
    with (runs["gelu"] / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = [(str(run), e) for run in (runs["gelu"], runs["dnrt"]) for e in _log(run)]
    assert len(rows) == len(expected)
    for row, (run, entry) in zip(rows, expected):
        assert row["run"] == run and int(row["epoch"]) == entry["epoch"]
        for key in ("train_ce", "test_loss", "test_acc1", "lr"):
            assert float(row[key]) == entry[key]
    assert rows[-1]["label"] == "dnrt: mlp, raa, ARR λ=10"


# --- profile -------------------------------------------------------------------------------------------------------

def test_macs_of_linear_and_conv_equal_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    counts = profile.count_macs(model, torch.randn(1, 3, 8, 8))
    conv = (8 * 8) * 4 * (3 * 3 * 3)  # output positions × output channels × kernel volume
    assert counts == {"macs": conv + 256 * 10, "raa_macs": 0, "attention_macs": 0}


def test_raa_shift_counts_d_macs_per_vector_in_both_layouts():
    tokens = nn.Sequential(nn.Linear(8, 16), RAA(16))
    counts = profile.count_macs(tokens, torch.randn(1, 5, 8))
    assert counts == {"macs": 5 * 8 * 16 + 5 * 16, "raa_macs": 5 * 16, "attention_macs": 0}
    maps = nn.Sequential(nn.Conv2d(3, 4, 1), RAA(4, base="relu", channel_dim=1))
    counts = profile.count_macs(maps, torch.randn(1, 3, 6, 6))
    assert counts == {"macs": 36 * 4 * 3 + 36 * 4, "raa_macs": 36 * 4, "attention_macs": 0}


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_attention_products_are_counted_apart():
    counts = profile.count_macs(_Attention(), torch.randn(1, 2, 5, 8))
    assert counts == {"macs": 0, "raa_macs": 0, "attention_macs": 2 * (2 * 5 * 5 * 8)}  # QKᵀ and AV, 2 heads


def test_vit_tiny_at_224_counts_1_075_g_in_weighted_layers():
    import timm
    model = timm.create_model("vit_tiny_patch16_224").eval()
    counts = profile.count_macs(model, torch.randn(1, 3, 224, 224))
    tokens, width = 197, 192  # 14×14 patches + class token; per block qkv, proj, fc1, fc2 = 12·width² per token
    assert counts["macs"] == 196 * width * (3 * 16 * 16) + 12 * tokens * 12 * width ** 2 + width * 1000
    assert counts["attention_macs"] == 12 * 2 * tokens ** 2 * width  # QKᵀ and AV in each of 12 blocks


def test_profile_cli_compares_original_and_dnrt(tmp_path, capsys):
    argv = ["-m", "mlp", "--img-size", "8", "--num-classes", "10", "--arr", "--min-time", "0.01",
            "--batch-size", "2", "--out", str(tmp_path / "p.md")]
    assert _cli(profile, argv) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    original, dnrt = result["rows"]["original"], result["rows"]["raa"]
    hidden = 256  # the MLP's default width; 3 hidden layers, each followed by an activation
    assert original["macs"] == 3 * 64 * hidden + 2 * hidden * hidden + hidden * 10
    assert dnrt["raa_macs"] == 3 * hidden and dnrt["macs"] == original["macs"] + 3 * hidden
    assert dnrt["params"] == original["params"] + 3 * (hidden + 1)
    means = 10 * 3 * hidden * 4  # 10 classes × 3 layers × hidden float32; the counts add at most an int64 each
    assert dnrt["arr_layers"] == 3 and means <= dnrt["arr_memory_bytes"] <= means + 3 * 10 * 8
    assert dnrt["latency_ms"] > 0 and dnrt["train_step_arr_ms"] > 0
    assert "| raa |" in capsys.readouterr().out


# --- responses -----------------------------------------------------------------------------------------------------

def _concentration_by_loops(r: np.ndarray, y: np.ndarray) -> float:
    """The ratio written out sample by sample and pair by pair."""
    classes = sorted(set(y.tolist()))
    means = {k: r[y == k].mean(axis=0) for k in classes}
    within = np.mean([np.mean(np.abs(r[i] - means[y[i]])) for i in range(len(y))])
    between = np.mean([np.mean(np.abs(means[a] - means[b])) for a, b in itertools.combinations(classes, 2)])
    return within / between


def test_concentration_equals_the_loop_formula():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    r = rng.normal(size=(60, 7)) + y[:, None]
    assert plots.concentration(r, y)["ratio"] == pytest.approx(_concentration_by_loops(r, y), rel=1e-12)
    with pytest.raises(DNRTError, match="at least two classes"):
        plots.concentration(r, np.zeros(60, dtype=int))


def test_responses_of_an_mlp_are_its_block_outputs(runs, tmp_path):
    res = plots.collect_responses(runs["dnrt"] / "checkpoint.pth", channels=20, batches=2, batch_size=100)
    assert res.kind == "net" and res.layers == [1, 2, 3] and len(res.labels) == 200
    from dnrt.tool.rundir import load_run
    from dnrt.tool.data import build_dataset
    model, _, cfg = load_run(runs["dnrt"] / "checkpoint.pth")
    x = build_dataset(cfg, train=False).tensors[0][:200].flatten(1)
    with torch.no_grad():
        for block, aggregated in zip(model.blocks, res.aggregated):
            x = block(x)
            np.testing.assert_allclose(aggregated, x.numpy(), atol=1e-5)
    assert res.channels[0].shape == (200, 20)


def test_plot_responses_side_by_side(runs, tmp_path, capsys):
    argv = ["responses", str(runs["gelu"] / "checkpoint.pth"), "--compare", str(runs["dnrt"] / "checkpoint.pth"),
            "--layers", "1", "3", "--classes", "0", "7", "--channels", "12", "--batches", "3", "--out", str(tmp_path)]
    assert _cli(plots, argv) == 0
    out = capsys.readouterr().out
    _check_png(tmp_path / "responses_channels.png", 2 * 700, 2 * 280)
    _check_png(tmp_path / "responses_classes.png", 2 * 700, 2 * 280)
    stats = json.loads((tmp_path / "responses.json").read_text())
    for entry, run in zip(stats, (runs["gelu"], runs["dnrt"])):
        res = plots.collect_responses(run / "checkpoint.pth", [1, 3], 12, batches=3)
        for layer, aggregated, channels in zip(entry["layers"], res.aggregated, res.channels):
            ratio = _concentration_by_loops(aggregated.astype(np.float64), res.labels)
            assert layer["concentration"]["ratio"] == pytest.approx(ratio, rel=1e-5)
            assert f"layer {layer['layer']}: within" in out
            np.testing.assert_allclose(layer["channels"]["median"], np.median(channels, axis=0), rtol=1e-6)
        seven = res.aggregated[-1][res.labels == 7, :12]
        assert entry["classes"][1]["n"] == len(seven)
        np.testing.assert_allclose(entry["classes"][1]["channels"]["mean"], seven.mean(axis=0), rtol=1e-5)


def test_vit_responses_come_from_the_class_token_after_the_mlp_activation(runs, tmp_path):
    path = plots.plot_responses([runs["vit"] / "checkpoint.pth"], tmp_path, channels=50, batches=2)
    _check_png(tmp_path / "responses_channels.png", 700, 2 * 280)
    stats = json.loads(path.read_text())[0]
    assert stats["token"] == "class token"
    assert [(l["layer"], l["channel_module"]) for l in stats["layers"]] == [(1, "blocks.0.mlp.act"),
                                                                             (2, "blocks.1.mlp.act")]
    assert len(stats["layers"][0]["channels"]["median"]) == 50  # 50 of the MLP's 64 hidden channels
    assert math.isfinite(stats["layers"][1]["concentration"]["ratio"])


def test_responses_reject_an_unknown_layer_and_class(runs):
    with pytest.raises(DNRTError, match="unknown layer 5: the model has layers 1..2"):
        plots.collect_responses(runs["vit"] / "checkpoint.pth", layers=[5])
    with pytest.raises(DNRTError, match="unknown class 'cat'"):
        plots.plot_responses([runs["vit"] / "checkpoint.pth"], classes=["cat"], batches=1)
    with pytest.raises(DNRTError, match="checkpoint not found"):
        plots.plot_responses([runs["vit"] / "nope.pth"])
