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

# ---------------------------------------------------------------- what a run costs (--dry_run, docs/cluster.md)
# Images per epoch (train, test) of each dataset label; ImageNet-100 is the usual 100-class subset (1,300 per class).
DATA_SIZES: dict[str, tuple[int, int]] = {
    "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "imagenet100": (126_689, 5_000),
    "imagenet1k": (1_281_167, 50_000), "cifar10_lt_b10": (20_431, 10_000), "cifar10_lt_b50": (13_996, 10_000),
    "cifar10_lt_b100": (12_406, 10_000),
}
# Forward multiply-adds per image (G) of each grid model with RAA at its image size, weights and attention products
# counted by `dnrt profile`'s count_macs. CaiT, which the counter fails on, from timm's card (cait_xxs24_224:
# 2.5 GMACs), at 32x32 scaled by its token count (64 / 196).
GMACS: dict[str, float] = {
    "vit_tiny_patch4_32": 0.3657, "deit_tiny_patch4_32": 0.3657, "cait_xxs_patch4_32": 0.82,
    "pvt_tiny_32": 0.0436, "tnt_small_patch4_32": 1.6422, "vit_tiny_patch16_224": 1.2553,
    "deit_tiny_patch16_224": 1.2553, "cait_xxs24_224": 2.5, "pvt_tiny_224": 0.5686, "tnt_s_patch16_224": 5.2238,
    "alexnet@32": 0.0893, "vgg11@32": 0.2725, "resnet18_cifar": 0.556, "mobilenet_v2@32": 0.025,
    "shufflenet_v2@32": 0.0454, "alexnet@224": 0.711, "vgg11@224": 7.6128, "resnet18": 1.8159,
    "mobilenet_v2@224": 0.3057, "shufflenet_v2@224": 0.1455, "resnet32_cifar": 0.0694,
}
# The one H100 training figure of the project (benchmarks/README.md, earlier code, 2026-11-26): ViT-Tiny patch 4 at
# 32x32 with RAA + ARR, AMP fp16, batch 256: 30.35 ms per step. Seconds per training image per forward GMAC:
H100_S_PER_GMAC = 30.35e-3 / 256 / GMACS["vit_tiny_patch4_32"]
EVAL_SHARE = 1 / 3  # a test image costs a forward, about a third of a training step's forward + backward


def gpu_hours(cell: Cell, epochs: int) -> Optional[float]:
    """Estimated H100-hours of a run: images x epochs x (forward GMACs x the ViT-Tiny rate); None for the CPU-sized
    runs (digits, graphs). Compute only: a data loader slower than the GPU makes it longer."""
    sizes = DATA_SIZES.get(cell.dataset)
    if sizes is None:
        return None
    name = MODEL_GRID[cell.model][DATA[cell.dataset].kind][1]
    size = 224 if DATA[cell.dataset].kind == "imagenet" else 32
    gmacs = GMACS.get(name, GMACS.get(f"{name}@{size}"))
    train, test = sizes
    return epochs * (train + EVAL_SHARE * test) * gmacs * H100_S_PER_GMAC / 3600


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


@dataclass(frozen=True)
class Planned:
    """A cell with one seed: its overrides, its config as it will run, and its run folder."""

    cell: Cell
    extra: tuple
    cfg: dict
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.run_dir.parent.name}_seed{self.cfg['seed']}"

    def as_run(self):
        """The launcher's view of it (dnrt.tool.launch.CellRun)."""
        from dnrt.tool.launch import CellRun
        return CellRun(self.name, str(self.cell.config.resolve()), self.extra, str(self.run_dir.resolve()),
                       self.cfg["epochs"])


def plan_cells(selected: Sequence[Cell], output_dir: Path, seeds: Sequence[Optional[int]] = (None,),
               epochs: Optional[int] = None, sets: Sequence[str] = ()) -> list[Planned]:
    """Every cell for every seed: its config loaded with the command line's changes, its run folder."""
    from dnrt.tool.config import load_config
    planned = []
    for cell, seed in ((c, s) for c in selected for s in seeds):
        if not cell.config.is_file():
            raise DNRTError(f"config {cell.config} is missing; `python -m dnrt.tool.reproduce` writes the configs")
        extra = overrides_for(seed, epochs, sets)
        cfg = load_config(str(cell.config), extra)
        run_dir = run_dir_for(cell, output_dir, cfg["seed"], epochs, sets)
        cfg["output_dir"] = str(run_dir)
        planned.append(Planned(cell, tuple(extra), cfg, run_dir))
    return planned


def dry_run(planned: Sequence[Planned], log=print) -> None:
    """List the runs (config, overrides, estimated GPU-hours on one H100) and the total."""
    total, unknown = 0.0, 0
    for p in planned:
        hours = gpu_hours(p.cell, p.cfg["epochs"])
        total += hours or 0.0
        unknown += hours is None
        cost = "  ~CPU minutes" if hours is None else f"  ~{hours:.2f} GPU-h"
        paper = "" if p.cell.paper is None else f"  paper {p.cell.paper}"
        log(f"{p.cell.dataset:16s} {p.cell.model:10s} {p.cell.column:9s} -c {_shown(p.cell.config)} "
            f"{' '.join([*p.extra, f'--output_dir={p.run_dir}'])}{paper}{cost}")
    cells_count = len({p.cell for p in planned})
    log(f"{len(planned)} runs ({cells_count} cells x {len(planned) // max(cells_count, 1)} seeds); each is "
        f"`dnrt train -c CONFIG OVERRIDES`")
    log(f"estimated cost: {total:.1f} GPU-hours on H100s" + (f" (+ {unknown} CPU-sized runs)" if unknown else "")
        + "; how it is estimated: docs/cluster.md")


def run_cells(selected: Sequence[Cell], output_dir: Path, seeds: Sequence[Optional[int]] = (None,),
              epochs: Optional[int] = None, sets: Sequence[str] = (), dry: bool = False,
              log=print) -> dict[Cell, list[float]]:
    """Run every cell for every seed one after another, skipping finished runs; return the results per cell."""
    planned = plan_cells(selected, output_dir, seeds, epochs, sets)
    if dry:
        dry_run(planned, log)
        return {}
    from dnrt.tool.launch import queued, read_record
    for i, p in enumerate(planned, 1):
        check_same_settings(p.run_dir, p.cfg)
        record = read_record(p.run_dir)
        if finished(p.run_dir, p.cfg["epochs"]):
            log(f"[{i}/{len(planned)}] {p.cell.name} seed {p.cfg['seed']}: finished, skipped ({p.run_dir})")
        elif queued(record):  # never two processes on one run folder
            log(f"[{i}/{len(planned)}] {p.cell.name} seed {p.cfg['seed']}: {record['state']} as job "
                f"{record['job_id']}, skipped here ({p.run_dir})")
        else:
            going_on = (p.run_dir / rundir.LATEST).is_file()  # train() continues an interrupted run from it
            log(f"[{i}/{len(planned)}] {p.cell.name} seed {p.cfg['seed']}: {'resuming' if going_on else 'training'} "
                f"-> {p.run_dir}")
            train_cell(p.cfg)
    return collect(planned)


def collect(planned: Sequence[Planned]) -> dict[Cell, list[float]]:
    """The reported number of every run that has one, per cell."""
    results: dict[Cell, list[float]] = {}
    for p in planned:
        value = result(p.run_dir)
        if value is not None:
            results.setdefault(p.cell, []).append(value)
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
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="list the runs with their configs and estimated GPU-hours, train or submit nothing")
    parser.add_argument("--output-dir", default="runs/paper", help="runs go to OUTPUT_DIR/<cell>/seed<S>")
    parser.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. data_root=/data batch_size=128)")
    parser.add_argument("--configs", default=str(CONFIG_ROOT),
                        help="the folder of the generated configs, written there where missing (default: %(default)s)")
    parser.add_argument("--status", action="store_true",
                        help="print every run's state from the run folders (done, running, failed, pending), "
                             "run nothing")
    launch = parser.add_argument_group("launchers (docs/cluster.md)")
    launch.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: on this machine (--jobs at once); slurm: one SLURM job per unfinished run, "
                             "as a job array through submitit (pip install 'dnrt[cluster]')")
    launch.add_argument("--jobs", type=int, default=1,
                        help="local: runs at once, each in its own process with its share of the CPU cores and "
                             "GPUs (default 1: one after another in this process)")
    launch.add_argument("--gpus_per_job", type=int, default=1,
                        help="GPUs of each run; more than 1 runs it under torch.distributed.run (default 1; 0 for "
                             "CPU-only SLURM jobs)")
    launch.add_argument("--slurm_partition", help="slurm: the partition (sbatch --partition)")
    launch.add_argument("--cpus_per_task", type=int, help="slurm: CPU cores of each job (sbatch --cpus-per-task)")
    launch.add_argument("--timeout_min", type=int, default=24 * 60,
                        help="slurm: time limit of each job in minutes; a run that needs longer is requeued "
                             "and continues (default %(default)s)")
    launch.add_argument("--slurm_array_parallelism", type=int, default=256,
                        help="slurm: most jobs of the array running at once (default %(default)s)")
    launch.add_argument("--slurm_additional", nargs="+", default=[], metavar="KEY=VALUE",
                        help="slurm: more sbatch options, e.g. account=proj qos=high mem=64G exclusive=true")


def sbatch_options(items: Sequence[str]) -> dict[str, Any]:
    """--slurm_additional's KEY=VALUE items as submitit's slurm_additional_parameters (`true` is a bare flag)."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DNRTError(f"--slurm_additional takes KEY=VALUE (an sbatch option without its dashes), got '{item}'")
        options[key.strip().lstrip("-").replace("-", "_")] = True if value.lower() == "true" else value
    return options


def check_launch_options(args: argparse.Namespace) -> None:
    """Options that cannot mean anything together, or out of range, each as one line."""
    for name in ("jobs", "timeout_min", "slurm_array_parallelism", "cpus_per_task"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DNRTError(f"--{name} must be at least 1, got {value}")
    if args.gpus_per_job < 0:
        raise DNRTError(f"--gpus_per_job must be 0 or more, got {args.gpus_per_job}")
    if args.launcher == "slurm" and args.jobs != 1:
        raise DNRTError("--jobs is for --launcher local; SLURM runs --slurm_array_parallelism jobs at once")
    given = [n for n in ("slurm_partition", "cpus_per_task", "slurm_additional") if getattr(args, n)]
    if args.launcher == "local" and given:
        raise DNRTError(f"--{given[0]} is for --launcher slurm")


def run(args: argparse.Namespace) -> int:
    """Run (or list, submit, or report on) the cells of a table; when they have run, print and write the Markdown
    table beside the paper's numbers."""
    if args.epochs is not None and args.epochs < 1:
        raise DNRTError(f"--epochs must be at least 1, got {args.epochs}")
    check_launch_options(args)
    selected = cells(args.table, args.datasets, args.models, args.acts, Path(args.configs))
    ensure_configs(selected, Path(args.configs))
    seeds = args.seeds or [None]
    out = Path(args.output_dir)
    if args.status:
        from dnrt.tool.launch import status_table
        print(status_table([p.as_run() for p in plan_cells(selected, out, seeds, args.epochs, args.sets)]), end="")
        return 0
    if args.dry_run or (args.launcher == "local" and args.jobs == 1):
        results = run_cells(selected, out, seeds, args.epochs, args.sets, args.dry_run)
        if args.dry_run:
            if args.launcher == "slurm":
                print(f"--launcher slurm would submit the unfinished ones as one job array, each with "
                      f"{slurm_options(args).parameters()}")
            return 0
    else:
        planned = plan_cells(selected, out, seeds, args.epochs, args.sets)
        for p in planned:
            check_same_settings(p.run_dir, p.cfg)
        if args.launcher == "slurm":
            return submit_slurm(args, planned, out)
        from dnrt.tool.launch import run_local
        codes = run_local([p.as_run() for p in planned], args.jobs, args.gpus_per_job, out / "jobs" / "local")
        failed = [name for name, code in codes.items() if code]
        if failed:
            raise DNRTError(f"{len(failed)} of {len(codes)} runs failed ({', '.join(failed[:3])}); "
                            f"`dnrt reproduce {args.table} --status` with the same options shows why")
        results = collect(planned)
    write_table(args, selected, results, out)
    return 0


def slurm_options(args: argparse.Namespace):
    """What each job asks of SLURM (dnrt.tool.launch.SlurmOptions)."""
    from dnrt.tool.launch import SlurmOptions
    return SlurmOptions(partition=args.slurm_partition, gpus_per_job=args.gpus_per_job,
                        cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
                        array_parallelism=args.slurm_array_parallelism,
                        additional=sbatch_options(args.slurm_additional), name=f"dnrt-{args.table}")


def submit_slurm(args: argparse.Namespace, planned: Sequence[Planned], out: Path) -> int:
    """Submit the unfinished runs as one SLURM job array and return; --status follows them."""
    from dnrt.tool.launch import submit
    jobs = submit([p.as_run() for p in planned], slurm_options(args), out / "jobs" / "slurm")
    print(f"submitted {len(jobs)} jobs; `dnrt reproduce {args.table} --status` (with the same selection options) "
          f"follows them, and the same command without --launcher renders the table once they are done")
    return 0


def write_table(args: argparse.Namespace, selected: Sequence[Cell], results: dict[Cell, list[float]],
                out: Path) -> None:
    """Print the table and write it to OUTPUT_DIR/TABLE[_changes].md, the raw numbers beside it as .json."""
    text = render_table(args.table, results, selected)
    name = args.table + _suffix(args.epochs, args.sets)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out / f"{name}.md", text)
    raw = {c.name: {"paper": c.paper, "measured": results.get(c, [])} for c in selected}
    rundir.write_json(out / f"{name}.json", raw)
    print(text)
    print(f"written: {out / (name + '.md')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the config files of the paper's grid.")
    parser.add_argument("folder", nargs="?", type=Path, default=CONFIG_ROOT,
                        help=f"where to write them (default {CONFIG_ROOT})")
    folder = parser.parse_args().folder
    print(f"wrote {len(write_configs(folder))} files under {folder}")
