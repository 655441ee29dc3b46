"""`dnrt reproduce`: the paper's tables as a grid of training runs, each set beside the paper's number.

The grid below (recipes, datasets, models, columns, tables) is the single description of every experiment;
it is written out as the config files under ./configs/paper/ of the current folder (by `python -m
dnrt.tool.reproduce`, or by `dnrt reproduce` where they are missing), which the runs load; never into the package.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from dnrt.errors import DNRTError
from dnrt.tool import rundir
from dnrt.tool.graph import GRAPHS

PAPER: dict[str, Any] = json.loads(Path(__file__).with_name("paper_results.json").read_text())
CONFIG_ROOT = Path("configs") / "paper"  # under the current folder (a clone's holds the committed files)

# ---------------------------------------------------------------- the grid
# A recipe is the training setting shared by a model family on a kind of data: (why, config values).
# the CPU study's training settings, shared by its ViT and MLP recipes
_DIGITS_CPU: dict[str, Any] = dict(
    batch_size=32, lr=1e-3, optimizer="adamw", weight_decay=0.05, epochs=30, scheduler="cosine", warmup_epochs=3,
    warmup_lr=1e-5, min_lr=1e-5, clip_max_norm=1.0, amp=False, seed=0, num_workers=0, device="cpu",
    print_freq=1000, save_interval=1000,
)
# the Fashion-MNIST CPU study's data and schedule, shared by its ViT and CNN recipes: 6,000 of the 60,000 training
# images (the first 600 of each class), the full 10,000-image test set, 6 epochs
_FASHION_CPU: dict[str, Any] = dict(
    train_subset=6000, batch_size=64, epochs=6, scheduler="cosine", amp=False, seed=0, num_workers=0,
    device="cpu", print_freq=1000, save_interval=1000,
)

RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_cifar": (
        "ViTs on 32x32 CIFAR: the authors' configs (docs/method.md section 5). Augmentation: the tool's default, "
        "timm create_transform with RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25.",
        dict(batch_size=256, lr=5e-4 * 256 / 512, optimizer="adamw", weight_decay=0.05, epochs=300,
             scheduler="cosine", warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, clip_max_norm=1.0,
             amp=True, seed=42, model_kwargs={"drop_path_rate": 0.1}),
    ),
    "vit_imagenet": (
        "ViTs on 224x224 ImageNet-100 / ImageNet-1K. Not stated in the paper: the DeiT recipe (AdamW, wd 0.05, "
        "lr 5e-4 x batch/512 with the batch summed over processes, 300 epochs, 5 warm-up epochs, drop-path 0.1, "
        "RandAugment + random erasing). Mixup/CutMix of DeiT are not part of the tool. Batch 256 per process: "
        "with 4 processes (torchrun --nproc_per_node=4) the global batch is DeiT's 1024.",
        dict(batch_size=256, lr=5e-4 * 1024 / 512, optimizer="adamw", weight_decay=0.05, epochs=300,
             scheduler="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, clip_max_norm=None,
             amp=True, seed=42, image_size=224, model_kwargs={"drop_path_rate": 0.1}),
    ),
    "cnn_cifar": (
        "CNNs on 32x32 CIFAR. Not stated in the paper: the standard CIFAR recipe, SGD momentum 0.9 (timm's "
        "'momentum': no Nesterov), lr 0.1 "
        "(0.01 for AlexNet/VGG-11, which have no batch norm), weight decay 5e-4, batch 128, 200 epochs, cosine.",
        dict(batch_size=128, lr=0.1, optimizer="momentum", momentum=0.9, weight_decay=5e-4, epochs=200,
             scheduler="cosine", warmup_epochs=0, min_lr=0.0, clip_max_norm=None, amp=True, seed=42),
    ),
    "cnn_imagenet": (
        "CNNs on 224x224 ImageNet-100. Not stated in the paper: the torchvision reference recipe, SGD momentum "
        "0.9, lr 0.1 for batch 256 (0.01 for AlexNet/VGG-11), weight decay 1e-4, 90 epochs, cosine instead of "
        "step decay.",
        dict(batch_size=256, lr=0.1, optimizer="momentum", momentum=0.9, weight_decay=1e-4, epochs=90,
             scheduler="cosine", warmup_epochs=0, min_lr=0.0, clip_max_norm=None, amp=True, seed=42,
             image_size=224),
    ),
    "cnn_cifar_lt": (
        "ResNet-32 on long-tailed CIFAR-10. Not stated in the paper: the usual long-tailed recipe (Cao et al. "
        "2019), SGD momentum 0.9, lr 0.1, weight decay 2e-4, batch 128, 200 epochs, 5 warm-up epochs, cosine "
        "instead of step decay at 160/180.",
        dict(batch_size=128, lr=0.1, optimizer="momentum", momentum=0.9, weight_decay=2e-4, epochs=200,
             scheduler="cosine", warmup_epochs=5, warmup_lr=0.01, min_lr=0.0, clip_max_norm=None, amp=True,
             seed=42),
    ),
    "gnn_dgraph": (
        "GCN / GraphSAGE on DGraph-Fin, full batch (dnrt/tool/graph.py). Not stated in the paper: the DGraph-Fin "
        "baseline setting, 2 layers, 128 hidden, no dropout, Adam lr 0.01, weight decay 5e-7, 200 epochs; the "
        "test ROC-AUC of the epoch with the best validation ROC-AUC is reported.",
        dict(lr=0.01, optimizer="adam", weight_decay=5e-7, epochs=200, seed=42, data_root="./data",
             model_kwargs={"hidden": 128, "num_layers": 2, "dropout": 0.0}),
    ),
    "gnn_small": (
        "Small-scale CPU study: GCN / GraphSAGE on sklearn's digits as a graph (8-nearest-neighbour graph of the "
        "1797 images, 10 % of the nodes labelled; dnrt/tool/graph.py). Kipf & Welling's small-graph setting: "
        "2 layers, 16 hidden, dropout 0.5, Adam lr 0.01, weight decay "
        "5e-4, 200 epochs; test accuracy at the best validation accuracy.",
        dict(lr=0.01, optimizer="adam", weight_decay=5e-4, epochs=200, seed=42,
             model_kwargs={"hidden": 16, "num_layers": 2, "dropout": 0.5}),
    ),
    "vit_digits": (
        "Small-scale CPU study: a 4-block ViT (width 64, 4 heads, patch 2) on sklearn's 8x8 digits, AdamW, "
        "30 epochs, batch 32 (28 steps per epoch on the 898 training images), no augmentation.",
        dict(_DIGITS_CPU,
             model_kwargs={"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}),
    ),
    "mlp_digits": (
        "Small-scale CPU study: the tool's MLP (3 hidden layers of 256, LayerNorm) on sklearn's 8x8 digits, "
        "AdamW, 30 epochs, batch 32, no augmentation.",
        dict(_DIGITS_CPU),
    ),
    "vit_fashion": (
        "Fashion-MNIST CPU study: a 4-block ViT (width 64, 4 heads, patch 4: 7x7 tokens on 28x28), AdamW, "
        "6 epochs on 6,000 training images (600 per class), batch 64, no augmentation; full 10,000-image test set.",
        dict(_FASHION_CPU, lr=1e-3, optimizer="adamw", weight_decay=0.05, warmup_epochs=1, warmup_lr=1e-5,
             min_lr=1e-5, clip_max_norm=1.0,
             model_kwargs={"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}),
    ),
    "cnn_fashion": (
        "Fashion-MNIST CPU study: ResNet-8 (the CIFAR ResNet with one basic block per stage, 16/32/64 channels), "
        "SGD momentum 0.9, lr 0.05, weight decay 5e-4, 6 epochs on 6,000 training images (600 per class), "
        "batch 64, cosine, no augmentation; full 10,000-image test set.",
        dict(_FASHION_CPU, lr=0.05, optimizer="momentum", momentum=0.9, weight_decay=5e-4, warmup_epochs=0,
             min_lr=0.0, clip_max_norm=None, model_kwargs={"blocks_per_stage": 1}),
    ),
}


@dataclass(frozen=True)
class DataSpec:
    """A dataset label of the grid: its config values, kind of data (picks the recipe) and number of classes."""

    values: dict
    kind: str
    classes: int


DATA: dict[str, DataSpec] = {
    "cifar10": DataSpec({"dataset": "cifar10"}, "cifar", 10),
    "cifar100": DataSpec({"dataset": "cifar100"}, "cifar", 100),
    "imagenet100": DataSpec({"dataset": "imagenet100"}, "imagenet", 100),
    "imagenet1k": DataSpec({"dataset": "imagenet1k"}, "imagenet", 1000),
    **{f"cifar10_lt_b{b}": DataSpec({"dataset": "cifar10_lt", "imbalance_factor": b}, "cifar_lt", 10)
       for b in (10, 50, 100)},
    "dgraphfin": DataSpec({"dataset": "dgraphfin"}, "dgraph", 2),
    "digits_knn": DataSpec({"dataset": "digits_knn"}, "small_graph", 10),
    "digits": DataSpec({"dataset": "digits"}, "digits", 10),
    "fashion_mnist": DataSpec({"dataset": "fashion_mnist"}, "fashion", 10),
    **{f"digits_lt_b{b}": DataSpec({"dataset": "digits_lt", "imbalance_factor": b}, "digits", 10)
       for b in (10, 50, 100)},
}

# Model label -> {kind of data: (recipe, model name in the tool, extra values)}.
_VIT32, _VIT224 = "vit_cifar", "vit_imagenet"
_NO_BN = {"lr": 0.01}
MODEL_GRID: dict[str, dict[str, tuple[str, str, dict]]] = {
    "vit_tiny": {"cifar": (_VIT32, "vit_tiny_patch4_32", {}), "cifar_lt": (_VIT32, "vit_tiny_patch4_32", {}),
                 "imagenet": (_VIT224, "vit_tiny_patch16_224", {})},
    "deit_tiny": {"cifar": (_VIT32, "deit_tiny_patch4_32", {}), "imagenet": (_VIT224, "deit_tiny_patch16_224", {})},
    "cait_xxs": {"cifar": (_VIT32, "cait_xxs_patch4_32", {}), "imagenet": (_VIT224, "cait_xxs24_224", {})},
    "pvt_tiny": {"cifar": (_VIT32, "pvt_tiny_32", {}), "imagenet": (_VIT224, "pvt_tiny_224", {})},
    "tnt_small": {"cifar": (_VIT32, "tnt_small_patch4_32", {}), "imagenet": (_VIT224, "tnt_s_patch16_224", {})},
    "alexnet": {"cifar": ("cnn_cifar", "alexnet", _NO_BN), "imagenet": ("cnn_imagenet", "alexnet", _NO_BN)},
    "vgg11": {"cifar": ("cnn_cifar", "vgg11", _NO_BN), "imagenet": ("cnn_imagenet", "vgg11", _NO_BN)},
    "resnet18": {"cifar": ("cnn_cifar", "resnet18_cifar", {}), "imagenet": ("cnn_imagenet", "resnet18", {})},
    "mobilenet": {"cifar": ("cnn_cifar", "mobilenet_v2", {}), "imagenet": ("cnn_imagenet", "mobilenet_v2", {})},
    "shufflenet": {"cifar": ("cnn_cifar", "shufflenet_v2", {}),
                   "imagenet": ("cnn_imagenet", "shufflenet_v2", {})},
    "resnet32": {"cifar_lt": ("cnn_cifar_lt", "resnet32_cifar", {})},
    "gcn": {"dgraph": ("gnn_dgraph", "gcn", {}), "small_graph": ("gnn_small", "gcn", {})},
    "sage": {"dgraph": ("gnn_dgraph", "sage", {}), "small_graph": ("gnn_small", "sage", {})},
    "vit": {"digits": ("vit_digits", "vit_tiny_patch4_32", {}), "fashion": ("vit_fashion", "vit_tiny_patch4_32", {})},
    "resnet8": {"fashion": ("cnn_fashion", "resnet32_cifar", {})},
    "mlp": {"digits": ("mlp_digits", "mlp", {})},
}

# Column -> (act, criterion): the activation everywhere in the model, and whether ARR is on.
COLUMNS: dict[str, tuple[str, str]] = {
    **{a: (a, "ce") for a in ("softplus", "elu", "selu", "silu", "relu", "gelu", "gdn")},
    "raa": ("raa", "ce"),
    "relu_arr": ("relu", "arr"),
    "gelu_arr": ("gelu", "arr"),
    "dnrt": ("raa", "arr"),
}
COLUMN_TITLES = {"softplus": "Softplus", "elu": "ELU", "selu": "SELU", "silu": "SiLU", "relu": "ReLU",
                 "gelu": "GELU", "gdn": "GDN", "raa": "RAA", "relu_arr": "ReLU+ARR", "gelu_arr": "GELU+ARR",
                 "dnrt": "DNRT (RAA+ARR)"}


def arr_weight(data: str) -> float:
    """λ of ARR: the paper's 10 for 10 classes and 20 for 100; our choice of 20 for ImageNet-1K, 1 for graphs."""
    spec = DATA[data]
    if spec.kind in ("dgraph", "small_graph"):
        return 1.0
    return 10.0 if spec.classes <= 10 else 20.0


@dataclass(frozen=True)
class Table:
    """A table of the paper (or of the small-scale study): rows are (dataset, model), columns are variants."""

    caption: str
    datasets: tuple
    models: tuple
    columns: tuple
    metric: str = "top-1 %"
    model_columns: Optional[dict] = None  # model -> its columns, where a model has only some of `columns`

    def has(self, model: str, column: str) -> bool:
        return column in (self.model_columns or {}).get(model, self.columns)


_A8 = ("softplus", "elu", "selu", "silu", "relu", "gelu", "gdn", "dnrt")
_ABLATION = ("relu", "gelu", "raa", "relu_arr", "gelu_arr", "dnrt")
_VITS = ("vit_tiny", "deit_tiny", "cait_xxs", "pvt_tiny", "tnt_small")
_DIGITS_LT = tuple(f"digits_lt_b{b}" for b in (10, 50, 100))
TABLES: dict[str, Table] = {
    "table1": Table("Table 1: ViTs", ("cifar10", "cifar100", "imagenet100"), _VITS, _A8),
    "table2": Table("Table 2: CNNs", ("cifar10", "cifar100", "imagenet100"),
                    ("alexnet", "vgg11", "resnet18", "mobilenet", "shufflenet"), _A8),
    "table3": Table("Table 3: ImageNet-1K", ("imagenet1k",), _VITS, ("relu", "gelu", "dnrt")),
    "table5_lt": Table("Table 5: long-tailed CIFAR-10, imbalance factor b",
                       tuple(f"cifar10_lt_b{b}" for b in (10, 50, 100)), ("vit_tiny", "resnet32"),
                       ("relu", "gelu", "dnrt")),
    "table5_graph": Table("Table 5: node classification on DGraph-Fin", ("dgraphfin",), ("gcn", "sage"),
                          ("relu", "gelu", "dnrt"), "ROC-AUC %"),
    "table6": Table("Table 6: ablation on CIFAR-100", ("cifar100",), ("vit_tiny", "resnet18"), _ABLATION),
    "digits": Table("Small-scale: the Table 6 ablation on sklearn digits", ("digits",), ("vit", "mlp"), _ABLATION),
    "digits_lt": Table("Small-scale: long-tailed digits, imbalance factor b", _DIGITS_LT, ("vit", "mlp"),
                       ("relu", "gelu", "dnrt")),
    "digits_graph": Table("Small-scale: node classification on the digits k-NN graph", ("digits_knn",),
                          ("gcn", "sage"), ("relu", "gelu", "dnrt")),
    "fashion": Table("Small-scale: the ablation on Fashion-MNIST (6,000 training images)", ("fashion_mnist",),
                     ("vit", "resnet8"), _ABLATION,
                     model_columns={"vit": ("gelu", "raa", "gelu_arr", "dnrt"),
                                    "resnet8": ("relu", "raa", "relu_arr", "dnrt")}),
}


# ---------------------------------------------------------------- cells and their config files
@dataclass(frozen=True)
class Cell:
    """One run of a table: a dataset, a model and a column, with its config file and the paper's number."""

    table: str
    dataset: str
    model: str
    column: str
    paper: Optional[float]
    root: Path = CONFIG_ROOT

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.model}_{self.column}"

    @property
    def recipe(self) -> str:
        return MODEL_GRID[self.model][DATA[self.dataset].kind][0]

    @property
    def config(self) -> Path:
        return self.root / self.recipe / f"{self.name}.py"


def paper_value(table: str, dataset: str, model: str, column: str) -> Optional[float]:
    """The paper's number for a cell, or None for the small-scale tables."""
    entry = PAPER.get(table)
    if entry is None:
        return None
    row = entry["rows"].get(f"{dataset}/{model}")
    return None if row is None else row[entry["columns"].index(column)]


def _check_names(kind: str, given: Optional[Sequence[str]], valid: Sequence[str], table: str) -> None:
    """Raise a DNRTError for a filter value that the table does not have."""
    for name in given or ():
        if name not in valid:
            raise DNRTError(f"{table} has no {kind} '{name}'; it has: {', '.join(valid)}")


def cells(table: str, datasets: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
          acts: Optional[Sequence[str]] = None, root: Path = CONFIG_ROOT) -> list[Cell]:
    """The cells of a table in the paper's order, optionally only some datasets, models or columns."""
    if table not in TABLES:
        raise DNRTError(f"unknown table '{table}'; tables: {', '.join(TABLES)}")
    spec = TABLES[table]
    for kind, given, valid in (("dataset", datasets, spec.datasets), ("model", models, spec.models),
                               ("column", acts, spec.columns)):
        _check_names(kind, given, valid, table)
    return [Cell(table, d, m, c, paper_value(table, d, m, c), Path(root))
            for d in spec.datasets if not datasets or d in datasets
            for m in spec.models if not models or m in models
            for c in spec.columns if (not acts or c in acts) and spec.has(m, c)]


GENERATED = "# Generated by `python -m dnrt.tool.reproduce` from its grid in dnrt/tool/reproduce.py: edit the grid."


def _assignments(values: dict[str, Any]) -> list[str]:
    """`key = value` lines in a stable order."""
    return [f"{k} = {v!r}" for k, v in values.items()]


def recipe_text(recipe: str) -> str:
    """The _base_.py of a recipe folder."""
    why, values = RECIPES[recipe]
    lines = [*textwrap.wrap(f"Recipe '{recipe}'. {why}", 110, initial_indent="# ", subsequent_indent="# "),
             GENERATED, "", *_assignments(values)]
    return "\n".join(lines) + "\n"


def cell_values(dataset: str, model: str, column: str) -> dict[str, Any]:
    """The config values a cell sets on top of its recipe."""
    _, model_name, extra = MODEL_GRID[model][DATA[dataset].kind]
    act, criterion = COLUMNS[column]
    values = {**DATA[dataset].values, "model": model_name, **extra, "act": act, "criterion": criterion}
    if criterion == "arr":
        values["arr_loss_coef"] = arr_weight(dataset)
    values["output_dir"] = f"runs/paper/{dataset}_{model}_{column}"
    return values


def cell_text(cell: Cell, tables: Sequence[str]) -> str:
    """A cell's config file: which tables use it with the paper's number, then its values."""
    act, criterion = COLUMNS[cell.column]
    arr = f" + ARR (lambda {arr_weight(cell.dataset):g})" if criterion == "arr" else ""
    used = []
    for t in tables:
        value = paper_value(t, cell.dataset, cell.model, cell.column)
        used.append(f"{t} (paper: {value})" if value is not None else t)
    run = f"dnrt train -c configs/paper/{cell.recipe}/{cell.name}.py"
    lines = [f"# {cell.model} on {cell.dataset}, activation {act}{arr}. Used by {', '.join(used)}.",
             f"# Recipe: _base_.py beside this file. Run: {run}",
             GENERATED,
             "from _base_ import *  # noqa: F401,F403", "",
             *_assignments(cell_values(cell.dataset, cell.model, cell.column))]
    return "\n".join(lines) + "\n"


def all_config_files(root: Path = CONFIG_ROOT) -> dict[Path, str]:
    """Every config file of every table, path -> text (a cell shared by two tables is one file)."""
    users: dict[Cell, list[str]] = {}
    for table in TABLES:
        for cell in cells(table, root=root):
            key = Cell("", cell.dataset, cell.model, cell.column, None, Path(root))
            users.setdefault(key, []).append(table)
    files = {Path(root) / r / "_base_.py": recipe_text(r) for r in sorted({c.recipe for c in users})}
    files.update({c.config: cell_text(c, t) for c, t in users.items()})
    return files


def write_configs(root: Path = CONFIG_ROOT) -> list[Path]:
    """Write every config file of the grid under root; return their paths."""
    files = all_config_files(root)
    for path, text in files.items():
        _write_config(path, text)
    return list(files)


def _write_config(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(path, text)


def ensure_configs(selected: Sequence[Cell], root: Path, log=print) -> None:
    """Write the grid's config files for `selected` under root where they are missing; a file there that differs
    from the grid (written by another version, or edited) is a DNRTError rather than a silent other experiment."""
    files = all_config_files(root)
    needed = {c.config for c in selected} | {c.config.parent / "_base_.py" for c in selected}
    stale = [p for p in sorted(needed) if p.is_file() and p.read_text() != files[p]]
    if stale:
        raise DNRTError(f"{stale[0]} differs from the grid of this dnrt version ({len(stale)} such files); "
                        f"delete them to have them written again, or choose another --configs folder")
    missing = [p for p in sorted(needed) if not p.is_file()]
    for path in missing:
        _write_config(path, files[path])
    if missing:
        log(f"wrote {len(missing)} config files of the grid under {_shown(root)}")


# ---------------------------------------------------------------- running
NEUTRAL_KEYS = ("data_root", "num_workers", "print_freq", "save_interval", "device")  # leave the results alone


def _suffix(epochs: Optional[int], sets: Sequence[str]) -> str:
    """A run-directory suffix naming what the command line changed, so different settings never share a run."""
    changed = [s.replace("=", "") for s in sets if s.partition("=")[0] not in NEUTRAL_KEYS]
    parts = ([f"e{epochs}"] if epochs is not None else []) + changed
    return "".join("_" + re.sub(r"[^A-Za-z0-9._+-]+", "-", p).strip("-") for p in parts)


def overrides_for(seed: Optional[int], epochs: Optional[int], sets: Sequence[str]) -> list[str]:
    """The `--key=value` overrides of one run, in the form load_config takes."""
    extra = ([f"--seed={seed}"] if seed is not None else []) + ([f"--epochs={epochs}"] if epochs is not None else [])
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DNRTError(f"--set takes KEY=VALUE, got '{item}'")
        if key in ("output_dir", "seed", "epochs"):
            raise DNRTError(f"set {key} with --{key.replace('_', '-')}{'s' if key == 'seed' else ''}, not --set")
        extra.append(f"--{key}={value}")
    return extra


def run_dir_for(cell: Cell, output_dir: Path, seed: int, epochs: Optional[int], sets: Sequence[str]) -> Path:
    """Where a cell's run with this seed and these command-line changes lives (shared by tables)."""
    return Path(output_dir) / f"{cell.name}{_suffix(epochs, sets)}" / f"seed{seed}"


def read_log(run_dir: Path) -> list[dict]:
    """The rows of a run's log.txt, [] when there is none (rundir.read_log)."""
    return rundir.read_log(run_dir)


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run's log holds its last epoch."""
    return any(r.get("epoch") == epochs - 1 for r in read_log(run_dir))


def check_same_settings(run_dir: Path, cfg: dict) -> None:
    """Raise a DNRTError when run_dir holds a run of other settings (e.g. the grid changed since it ran)."""
    saved = rundir.read_config(run_dir)
    if not saved:
        return
    changed = list(rundir.changed_keys(saved, cfg, rundir.NEUTRAL_KEYS).items())
    if changed:
        raise DNRTError(f"{run_dir} holds a run with other settings ({rundir.describe(dict(changed[:3]))}); "
                        f"delete it or choose another --output-dir")


def result(run_dir: Path) -> Optional[float]:
    """A run's reported number: test top-1 of the best epoch, or the test metric at the best validation one."""
    rows = [r for r in read_log(run_dir) if r.get("test_acc1") is not None]
    if not rows:
        return None
    if all("valid_acc1" in r for r in rows):
        return max(rows, key=lambda r: r["valid_acc1"])["test_acc1"]
    return max(r["test_acc1"] for r in rows)


def _shown(path: Path) -> str:
    """A path relative to the working directory where it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def train_cell(cfg: dict) -> None:
    """One training run: the tool's train() for images, graph.train_graph() for the graph datasets."""
    if cfg["dataset"] in GRAPHS:
        from dnrt.tool.graph import train_graph
        train_graph(cfg)
    else:
        from dnrt.tool.train import train
        train(cfg)


def run_cells(selected: Sequence[Cell], output_dir: Path, seeds: Sequence[Optional[int]] = (None,),
              epochs: Optional[int] = None, sets: Sequence[str] = (), dry_run: bool = False,
              log=print) -> dict[Cell, list[float]]:
    """Run every cell for every seed one after another, skipping finished runs; return the results per cell."""
    from dnrt.tool.config import load_config
    results: dict[Cell, list[float]] = {}
    total = len(selected) * len(seeds)
    for i, (cell, seed) in enumerate(((c, s) for c in selected for s in seeds), 1):
        if not cell.config.is_file():
            raise DNRTError(f"config {cell.config} is missing; `python -m dnrt.tool.reproduce` writes the configs")
        extra = overrides_for(seed, epochs, sets)
        cfg = load_config(str(cell.config), extra)
        run_dir = run_dir_for(cell, output_dir, cfg["seed"], epochs, sets)
        cfg["output_dir"] = str(run_dir)
        paper = "" if cell.paper is None else f"  paper {cell.paper}"
        if dry_run:
            log(f"{cell.dataset:16s} {cell.model:10s} {cell.column:9s} -c {_shown(cell.config)} "
                f"{' '.join(extra + [f'--output_dir={run_dir}'])}{paper}")
            continue
        check_same_settings(run_dir, cfg)
        if finished(run_dir, cfg["epochs"]):
            log(f"[{i}/{total}] {cell.name} seed {cfg['seed']}: finished, skipped ({run_dir})")
        else:
            going_on = (run_dir / rundir.LATEST).is_file()  # train() continues an interrupted run from it
            log(f"[{i}/{total}] {cell.name} seed {cfg['seed']}: {'resuming' if going_on else 'training'} "
                f"-> {run_dir}")
            train_cell(cfg)
        value = result(run_dir)
        if value is not None:
            results.setdefault(cell, []).append(value)
    if dry_run:
        log(f"{total} runs ({len(selected)} cells x {len(seeds)} seeds); each is `dnrt train -c CONFIG OVERRIDES`")
    return results


# ---------------------------------------------------------------- the table
def summary(values: Sequence[float]) -> str:
    """Mean, with ± the sample standard deviation when there are several seeds."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def cell_entry(values: Sequence[float], paper: Optional[float]) -> str:
    """One table entry: measured (paper, measured − paper), or a dash for a cell without runs."""
    if not values:
        return "—" if paper is None else f"— ({paper})"
    if paper is None:
        return summary(values)
    return f"{summary(values)} ({paper}, {statistics.mean(values) - paper:+.1f})"


def render_table(table: str, results: dict[Cell, list[float]], selected: Optional[Sequence[Cell]] = None) -> str:
    """A Markdown table laid out as the paper's: rows (dataset, model), one column per variant."""
    spec = TABLES[table]
    chosen = list(selected) if selected is not None else list(results)
    columns = [c for c in spec.columns if any(x.column == c for x in chosen)]
    rows = [(d, m) for d in spec.datasets for m in spec.models
            if any(x.dataset == d and x.model == m for x in chosen)]
    by_key = {(c.dataset, c.model, c.column): c for c in chosen}
    seeds = sorted({len(v) for v in results.values()}) or [0]
    note = "mean ± sample std over " + "/".join(map(str, seeds)) + " seeds" if seeds[-1] > 1 else "one seed"
    has_paper = any(c.paper is not None for c in chosen)
    graph = any(c.dataset in GRAPHS for c in chosen)
    epoch = "test at the best validation epoch" if graph else "best epoch"
    lines = [f"**{spec.caption}** — measured {spec.metric} ({epoch}; {note})"
             + (", then (paper, measured − paper)" if has_paper else ""), "",
             "| data | model | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for d, m in rows:
        entries = []
        for c in columns:
            cell = by_key.get((d, m, c))
            entries.append("" if cell is None else cell_entry(results.get(cell, []), cell.paper))
        lines.append(f"| {d} | {m} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dnrt reproduce`."""
    parser.add_argument("table", help=f"one of: {', '.join(TABLES)}")
    parser.add_argument("--datasets", nargs="+", help="only these dataset rows (e.g. cifar10 digits_lt_b10)")
    parser.add_argument("--models", nargs="+", help="only these models (e.g. vit_tiny resnet18 mlp)")
    parser.add_argument("--acts", nargs="+", help="only these columns (e.g. relu gelu raa relu_arr dnrt)")
    parser.add_argument("--epochs", type=int, help="train every cell for N epochs instead of the recipe's")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every cell once per seed (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs with their configs, train nothing")
    parser.add_argument("--output-dir", default="runs/paper", help="runs go to OUTPUT_DIR/<cell>/seed<S>")
    parser.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. data_root=/data batch_size=128)")
    parser.add_argument("--configs", default=str(CONFIG_ROOT),
                        help="the folder of the generated configs, written there where missing (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run (or list) the cells of a table, then print and write the Markdown table beside the paper's numbers."""
    if args.epochs is not None and args.epochs < 1:
        raise DNRTError(f"--epochs must be at least 1, got {args.epochs}")
    selected = cells(args.table, args.datasets, args.models, args.acts, Path(args.configs))
    ensure_configs(selected, Path(args.configs))
    seeds = args.seeds or [None]
    results = run_cells(selected, Path(args.output_dir), seeds, args.epochs, args.sets, args.dry_run)
    if args.dry_run:
        return 0
    text = render_table(args.table, results, selected)
    name = args.table + _suffix(args.epochs, args.sets)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out / f"{name}.md", text)
    raw = {c.name: {"paper": c.paper, "measured": results.get(c, [])} for c in selected}
    rundir.write_json(out / f"{name}.json", raw)
    print(text)
    print(f"written: {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the config files of the paper's grid.")
    parser.add_argument("folder", nargs="?", type=Path, default=CONFIG_ROOT,
                        help=f"where to write them (default {CONFIG_ROOT})")
    folder = parser.parse_args().folder
    print(f"wrote {len(write_configs(folder))} files under {folder}")
