"""`dnrt reproduce`: the grid of the paper's tables, its config files, long-tailed counts and the rendered table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dnrt.errors import DNRTError
from dnrt.tool import reproduce as R
from dnrt.tool.config import load_config
from dnrt.tool.data import build_dataset, build_transform, dataset_info, long_tailed_indices

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.fixture(autouse=True)
def in_the_clone(monkeypatch):
    """The grid's configs are read from ./configs/paper: run from the repository root, wherever pytest started."""
    monkeypatch.chdir(REPO_CONFIGS.parents[1])


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_table1_dry_run_lists_every_cell(capsys, tmp_path):
    assert R.run(parse("table1", "--dry-run", "--output-dir", str(tmp_path))) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--output_dir=" in line]
    assert len(lines) == 5 * 3 * 8
    configs = {line.split(" -c ")[1].split()[0] for line in lines}
    assert len(configs) == 120 and all(Path(c).is_file() for c in configs)
    assert any("cifar10_vit_tiny_dnrt.py" in line and "paper 92.1" in line for line in lines)
    assert not list(tmp_path.iterdir())  # a dry run trains and writes nothing


@pytest.mark.parametrize("table, count", [("table2", 120), ("table3", 15), ("table5_lt", 18), ("table5_graph", 6),
                                          ("table6", 12), ("digits", 12), ("digits_lt", 18), ("digits_graph", 6),
                                          ("fashion", 8)])
def test_table_sizes(table, count):
    assert len(R.cells(table)) == count


def test_filters_and_unknown_names():
    chosen = R.cells("table1", datasets=["cifar100"], models=["vit_tiny", "pvt_tiny"], acts=["relu", "dnrt"])
    assert [c.name for c in chosen] == ["cifar100_vit_tiny_relu", "cifar100_vit_tiny_dnrt",
                                        "cifar100_pvt_tiny_relu", "cifar100_pvt_tiny_dnrt"]
    with pytest.raises(DNRTError, match="unknown table 'table9'"):
        R.cells("table9")
    with pytest.raises(DNRTError, match="table6 has no model 'mlp'"):
        R.cells("table6", models=["mlp"])
    with pytest.raises(DNRTError, match="--set takes KEY=VALUE"):
        R.run(parse("digits", "--dry-run", "--set", "lr"))
    with pytest.raises(DNRTError, match="set seed with --seeds"):
        R.run(parse("digits", "--dry-run", "--set", "seed=3"))
    assert R._suffix(5, ["data_root=/data", "lr=0.1", "model_kwargs={'depth': 2}"]) == "_e5_lr0.1_model_kwargs-depth-2"


def test_paper_numbers_spot_checks():
    """A few numbers of the paper's tables, typed again here independently of paper_results.json."""
    expected = {("table1", "cifar100", "tnt_small", "softplus"): 65.2,
                ("table1", "imagenet100", "deit_tiny", "gdn"): 66.3,
                ("table2", "cifar10", "resnet18", "gdn"): 82.3,
                ("table2", "imagenet100", "vgg11", "silu"): 87.0,
                ("table3", "imagenet1k", "pvt_tiny", "dnrt"): 76.1,
                ("table5_lt", "cifar10_lt_b100", "resnet32", "dnrt"): 82.0,
                ("table5_lt", "cifar10_lt_b50", "vit_tiny", "gelu"): 49.3,
                ("table5_graph", "dgraphfin", "sage", "relu"): 75.1,
                ("table6", "cifar100", "resnet18", "relu_arr"): 76.3,
                ("table6", "cifar100", "vit_tiny", "gelu_arr"): 68.5}
    for (table, data, model, column), value in expected.items():
        assert R.paper_value(table, data, model, column) == value
    assert all(c.paper is not None for t in R.PAPER if t.startswith("table") for c in R.cells(t))
    assert all(c.paper is None for c in R.cells("digits"))


def test_config_files_are_the_grid():
    """The committed configs are exactly what the grid generates (edit the grid, regenerate)."""
    files = R.all_config_files(REPO_CONFIGS)
    on_disk = set(REPO_CONFIGS.rglob("*.py"))
    assert on_disk == set(files), "configs/paper differs from the grid: run python -m dnrt.tool.reproduce"
    assert all(path.read_text() == text for path, text in files.items())


def test_configs_are_written_under_the_current_folder(tmp_path, monkeypatch, capsys):
    """Outside a clone (an installed package) the configs a table needs are written to ./configs/paper, and a file
    there that differs from the grid is refused rather than run."""
    monkeypatch.chdir(tmp_path)
    assert R.run(parse("digits", "--dry-run", "--models", "mlp", "--output-dir", "out")) == 0
    out = capsys.readouterr().out
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    columns = ("relu", "gelu", "raa", "relu_arr", "gelu_arr", "dnrt")
    assert written == sorted(Path("configs/paper/mlp_digits") / name
                             for name in ["_base_.py"] + [f"digits_mlp_{c}.py" for c in columns])
    assert "wrote 7 config files of the grid under configs/paper" in out
    assert all((tmp_path / p).read_text() == (REPO_CONFIGS.parent.parent / p).read_text() for p in written)
    assert " -c configs/paper/mlp_digits/digits_mlp_dnrt.py " in out
    R.run(parse("digits", "--dry-run", "--models", "mlp", "--output-dir", "out"))  # a repeat writes nothing
    assert "wrote" not in capsys.readouterr().out
    edited = tmp_path / "configs/paper/mlp_digits/digits_mlp_dnrt.py"
    edited.write_text(edited.read_text() + "epochs = 1\n")
    with pytest.raises(DNRTError, match="digits_mlp_dnrt.py differs from the grid of this dnrt version"):
        R.run(parse("digits", "--dry-run", "--models", "mlp", "--output-dir", "out"))


def test_every_config_loads_with_its_cell_values():
    weights = {}
    for table in R.TABLES:
        for cell in R.cells(table):
            cfg = load_config(str(cell.config))
            act, criterion = R.COLUMNS[cell.column]
            assert (cfg["act"], cfg["criterion"]) == (act, criterion)
            assert cfg["model"] == R.MODEL_GRID[cell.model][R.DATA[cell.dataset].kind][1]
            if criterion == "arr":
                weights.setdefault(cell.dataset, set()).add(cfg["arr_loss_coef"])
    assert weights["cifar10"] == {10.0} and weights["cifar100"] == {20.0}  # the paper's lambda
    assert weights["cifar10_lt_b100"] == {10.0} and weights["imagenet1k"] == {20.0} and weights["dgraphfin"] == {1.0}
    cfg = load_config(str(R.cells("table5_lt", datasets=["cifar10_lt_b50"])[0].config))
    assert (cfg["dataset"], cfg["imbalance_factor"]) == ("cifar10_lt", 50)
    assert load_config(str(R.cells("table2", models=["vgg11"])[0].config))["lr"] == 0.01


def _fake_input(cfg: dict) -> tuple[torch.Tensor, int]:
    """A batch through the config's evaluation transform, built from a random image of the dataset's kind."""
    info = dataset_info(cfg)
    transform = build_transform(cfg, train=False)
    size = 300 if info["img_size"] >= 224 else info["img_size"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    train_image = build_transform(cfg, train=True)(image)
    assert train_image.shape == (3, info["img_size"], info["img_size"])
    return torch.stack([transform(image)] * 2), info["num_classes"]


def test_every_model_builds_with_its_data_pipeline():
    """Each model name of every table once (at the first image size it is used with; torchvision's CNNs take any),
    every config's transforms: config -> transforms -> model with RAA -> ARR -> logits."""
    from dnrt.tool.models import build_arr
    from dnrt.tool.train import build_model

    seen = set()
    for table in ("table1", "table2", "table3", "table5_lt", "table6"):
        for cell in R.cells(table, acts=["dnrt"]):
            cfg = load_config(str(cell.config))
            images, num_classes = _fake_input(cfg)
            assert num_classes == R.DATA[cell.dataset].classes
            assert images.shape[-1] == (224 if "imagenet" in cell.dataset else 32)
            if cfg["model"] in seen:
                continue
            seen.add(cfg["model"])
            args = {"num_classes": 10, "in_chans": 3, "img_size": images.shape[-1]}  # a smaller head, same body
            model, arr = build_model(cfg, args, torch.device("cpu"))
            model.eval()
            with torch.no_grad():
                assert model(images).shape == (2, 10), cell.name
            assert arr is not None and arr.layers, cell.name
            assert build_arr(model, {**cfg, "criterion": "ce"}, 10) is None
            arr.remove()
    assert len(seen) == 17


def test_digits_configs_build_on_real_data():
    for cell in R.cells("digits_lt", acts=["dnrt"], datasets=["digits_lt_b10"]):
        cfg = load_config(str(cell.config))
        train, test = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
        assert len(test) == 899 and len(train) < 898
        assert train[0][0].shape == (1, 8, 8)


def test_fashion_study_cells_and_configs():
    """Each model with its baseline activation, RAA, baseline + ARR and RAA + ARR (lambda 10), on 6,000 of the
    training images; the configs build their model for 28x28 grey images without reading the data."""
    from dnrt.tool.train import build_model

    chosen = R.cells("fashion")
    assert [c.name for c in chosen] == [f"fashion_mnist_{m}_{c}" for m, columns in
                                        (("vit", ("gelu", "raa", "gelu_arr", "dnrt")),
                                         ("resnet8", ("relu", "raa", "relu_arr", "dnrt"))) for c in columns]
    assert [c.name for c in R.cells("fashion", acts=["relu"])] == ["fashion_mnist_resnet8_relu"]
    for cell in chosen:
        cfg = load_config(str(cell.config))
        assert (cfg["dataset"], cfg["train_subset"], cfg["epochs"]) == ("fashion_mnist", 6000, 6)
        assert cfg["criterion"] == ("arr" if cell.column in ("gelu_arr", "relu_arr", "dnrt") else "ce")
        assert cfg["criterion"] == "ce" or cfg["arr_loss_coef"] == 10.0
        if cell.column == "dnrt":
            args = dataset_info(cfg)
            assert args == {"num_classes": 10, "in_chans": 1, "img_size": 28}
            model, arr = build_model(cfg, args, torch.device("cpu"))
            assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
            assert len(arr.layers) == (4 if cell.model == "vit" else 3)  # the 4 blocks; ResNet-8's 3 stages
            arr.remove()


@pytest.mark.parametrize("beta, total", [(10, 20431), (50, 13996), (100, 12406)])
def test_long_tailed_counts_on_cifar10_like_targets(beta, total):
    """CIFAR-10-LT sizes from the literature (Cao et al. 2019): 20,431 / 13,996 / 12,406 training images."""
    targets = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 5000))
    keep = long_tailed_indices(targets.tolist(), beta)
    counts = np.bincount(targets[keep], minlength=10)
    assert counts.sum() == total
    assert counts[0] == 5000 and counts[-1] == 5000 // beta
    assert all(counts[i] == int(5000 * beta ** (-i / 9)) for i in range(10))
    assert len(set(keep)) == len(keep)
    if beta == 100:
        assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_digits_lt_keeps_test_set_and_decays_training_classes():
    base = load_config(str(R.cells("digits", models=["mlp"], acts=["relu"])[0].config))
    full = np.bincount([int(y) for _, y in build_dataset(base, train=True)], minlength=10)
    cfg = {**base, "dataset": "digits_lt", "imbalance_factor": 10}
    counts = np.bincount([int(y) for _, y in build_dataset(cfg, train=True)], minlength=10)
    assert counts.tolist() == [min(full[i], int(full.max() * 10 ** (-i / 9))) for i in range(10)]
    assert len(build_dataset(cfg, train=False)) == len(build_dataset(base, train=False))


def _write_log(run_dir: Path, accs: list[float], valid: list[float] | None = None) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"epoch": e, "test_acc1": a, **({"valid_acc1": valid[e]} if valid else {})} for e, a in enumerate(accs)]
    (run_dir / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_render_from_logs_mean_std_and_difference(tmp_path):
    chosen = R.cells("table6", models=["vit_tiny"], acts=["relu", "dnrt"])
    relu, dnrt = chosen
    _write_log(R.run_dir_for(relu, tmp_path, 1, 2, ()), [60.0, 66.0])
    _write_log(R.run_dir_for(relu, tmp_path, 2, 2, ()), [64.0, 63.0])
    _write_log(R.run_dir_for(dnrt, tmp_path, 1, 2, ()), [70.0, 69.0])
    results = {c: [R.result(R.run_dir_for(c, tmp_path, s, 2, ())) for s in (1, 2)] for c in chosen}
    results[dnrt] = [v for v in results[dnrt] if v is not None]
    text = R.render_table("table6", results, chosen)
    row = [line for line in text.splitlines() if line.startswith("| cifar100 | vit_tiny |")][0]
    # relu: best epochs 66 and 64 -> 65.0 ± 1.4 (sample std of 66, 64 is sqrt(2)); paper 65.7
    assert row == "| cifar100 | vit_tiny | 65.0 ± 1.4 (65.7, -0.7) | 70.0 (71.4, -1.4) |"
    assert "| data | model | ReLU | DNRT (RAA+ARR) |" in text


def test_result_uses_best_validation_epoch_when_logged(tmp_path):
    _write_log(tmp_path / "g", [70.0, 80.0, 75.0], valid=[50.0, 40.0, 60.0])
    assert R.result(tmp_path / "g") == 75.0
    assert R.result(tmp_path / "none") is None


def test_two_tiny_runs_rendered_and_skipped_on_rerun(tmp_path, capsys):
    argv = ["digits", "--models", "mlp", "--acts", "relu", "dnrt", "--epochs", "1", "--seeds", "3",
            "--output-dir", str(tmp_path), "--set", "batch_size=256", "warmup_epochs=0"]
    assert R.run(parse(*argv)) == 0
    runs = sorted(tmp_path.glob("digits_mlp_*_e1_batch_size256_warmup_epochs0/seed3"))
    assert len(runs) == 2
    logs = {p.parent.name.split("_")[2]: [json.loads(line) for line in (p / "log.txt").read_text().splitlines()]
            for p in runs}
    assert json.loads((runs[0] / "config.json").read_text())["batch_size"] == 256
    table = (tmp_path / "digits_e1_batch_size256_warmup_epochs0.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| digits | mlp |")][0]
    assert row == f"| digits | mlp | {logs['relu'][0]['test_acc1']:.1f} | {logs['dnrt'][0]['test_acc1']:.1f} |"
    assert logs["dnrt"][0]["train_arr"] > 0 and logs["relu"][0]["train_arr"] == 0
    before = [(p / "log.txt").stat().st_mtime_ns for p in runs]
    capsys.readouterr()
    assert R.run(parse(*argv)) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert [(p / "log.txt").stat().st_mtime_ns for p in runs] == before


def test_a_run_of_other_settings_is_not_taken_as_this_cell(tmp_path):
    cell = R.cells("digits", models=["mlp"], acts=["relu"])[0]
    cfg = load_config(str(cell.config), ["--seed=0"])
    run_dir = R.run_dir_for(cell, tmp_path, 0, None, ())
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**cfg, "lr": 5.0, "data_root": "/elsewhere"}))
    with pytest.raises(DNRTError, match=r"holds a run with other settings \(lr: 5.0 -> 0.001\)"):
        R.run(parse("digits", "--models", "mlp", "--acts", "relu", "--seeds", "0", "--output-dir", str(tmp_path)))
    (run_dir / "config.json").write_text(json.dumps({**cfg, "data_root": "/elsewhere", "output_dir": "x"}))
    R.check_same_settings(run_dir, cfg)  # where the data lies and where the run was written do not matter
