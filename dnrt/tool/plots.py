"""`dnrt plot curves|responses`: training curves of runs (Fig. 3) and response distributions (Fig. 2)."""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
import torch
from sklearn.metrics import pairwise_distances
from torch import nn
from torch.utils.data import DataLoader

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dnrt.errors import DNRTError  # noqa: E402
from dnrt.tool import rundir  # noqa: E402
from dnrt.tool.compare import read_log, run_label  # noqa: E402
from dnrt.tool.rundir import read_config  # noqa: E402

CURVE_PANELS = (("train_ce", "train cross-entropy"), ("test_loss", "test cross-entropy"),
                ("test_acc1", "test top-1 (%)"), ("lr", "learning rate"))
CURVES_SIZE = (10.0, 7.5)  # inches at DPI → 1000 × 750 px
PANEL_SIZE = (7.0, 2.8)  # inches per response panel → 700 × 280 px each
DPI = 100


def curve_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The numbers behind the curves figure: one row per run and epoch, as logged (None: not evaluated that epoch)."""
    rows = []
    for run_dir in run_dirs:
        label = run_label(run_dir, read_config(run_dir))
        for entry in read_log(run_dir):
            values = {key: None if entry.get(key) is None else float(entry[key]) for key, _ in CURVE_PANELS}
            rows.append({"run": str(run_dir), "label": label, "epoch": int(entry["epoch"]), **values})
    return rows


def plot_curves(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None) -> Path:
    """Draw train/test cross-entropy, test top-1 and lr over epochs, runs overlaid; write curves.png and .csv."""
    if not run_dirs:
        raise DNRTError("plot curves needs at least one run directory")
    rows = curve_rows(run_dirs)
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    fig, axes = plt.subplots(2, 2, figsize=CURVES_SIZE, dpi=DPI)
    for ax, (key, title) in zip(axes.flat, CURVE_PANELS):
        for mine in runs.values():
            points = [r for r in mine if r[key] is not None]
            ax.plot([r["epoch"] + 1 for r in points], [r[key] for r in points],
                    marker="." if len(points) < 30 else None, label=mine[0]["label"])
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    path = rundir.output_path(out, run_dirs[0], "curves.png")
    _save(fig, path)
    _write_csv(path.with_suffix(".csv"), rows)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write dict rows as CSV with a header (floats in repr form, so they read back exactly; None as empty)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with rundir.output_error(path):
        rundir.write_text(path, text.getvalue())


@dataclass
class Responses:
    """One checkpoint's responses on its test set, per chosen layer: the Figure 2 data."""

    label: str
    kind: str  # "vit": channels from the MLP activations; "net": channels of the pooled ARR taps
    token: str  # what a ViT's channels are taken from: "class token" or "token mean"
    layers: list[int]  # 1-based, as in the paper's figure
    channel_modules: list[str]
    aggregated_modules: list[str]
    channels: list[np.ndarray]  # per layer [n, C]: first C channels (class token after the MLP activation)
    aggregated: list[np.ndarray]  # per layer [n, d]: ARR's aggregated response of the block / stage
    labels: np.ndarray
    class_names: list[str]


def concentration(responses: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Within-class L1 spread (mean |r − class mean|) over between-class distance (mean L1 between class means)."""
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DNRTError("response concentration needs samples of at least two classes; give more --batches")
    means = np.stack([responses[labels == k].mean(axis=0) for k in classes])
    within = float(np.abs(responses - means[np.searchsorted(classes, labels)]).mean())
    distances = pairwise_distances(means, metric="manhattan") / responses.shape[1]
    between = float(distances[np.triu_indices(len(classes), k=1)].mean())
    return {"within": within, "between": between, "ratio": within / between}


def _vit_activations(model: nn.Module) -> list[str]:
    """Names of a ViT's MLP activation modules (`blocks.{i}.mlp.act`) in block order; empty for other models."""
    names = dict(model.named_modules())
    return [f"blocks.{i}.mlp.act" for i in range(len(names)) if f"blocks.{i}.mlp.act" in names]


def _pick_layers(available: int, layers: Optional[Sequence[int]]) -> list[int]:
    """1-based layer numbers: the given ones (checked), else 1, 4, 10 where they exist (Fig. 2), else all."""
    if layers:
        bad = [n for n in layers if not 1 <= n <= available]
        if bad:
            raise DNRTError(f"unknown layer {bad[0]}: the model has layers 1..{available}")
        return list(layers)
    return [n for n in (1, 4, 10) if n <= available] if available > 4 else list(range(1, available + 1))


def _taps(model: nn.Module, num_classes: int,
          layers: Optional[Sequence[int]]) -> tuple[list[int], list[str], list[str]]:
    """Chosen layer numbers, their MLP activation modules (ViT; else empty) and the blocks / stages ARR taps."""
    from dnrt import ARR

    acts = _vit_activations(model)
    if acts:
        numbers = _pick_layers(len(acts), layers)
        return numbers, [acts[n - 1] for n in numbers], [f"blocks.{n - 1}" for n in numbers]
    auto = ARR(model, num_classes)
    names = list(auto.layers)
    auto.remove()
    numbers = _pick_layers(len(names), layers)
    return numbers, [], [names[n - 1] for n in numbers]


def _has_class_token(model: nn.Module, tokens: int) -> bool:
    """Whether token 0 of a `tokens`-long sequence is the class token (not in CaiT's blocks, which see patches only)."""
    if getattr(model, "cls_token", None) is None:
        return False
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    return patches is None or tokens == patches + getattr(model, "num_prefix_tokens", 1)


def _class_token_hook(model: nn.Module, store: list[torch.Tensor], used: dict[str, str], channels: int):
    """A forward hook keeping the first `channels` channels of the class token (or of the token mean)."""
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        cls = _has_class_token(model, output.shape[1])
        used["token"] = "class token" if cls else "token mean"
        store.append((output[:, 0] if cls else output.mean(dim=1))[:, :channels].float().cpu())
    return hook


class _Probe:
    """Hooks recording each batch's aggregated responses (a fresh ARR on `tapped`) and class tokens of `act_names`."""

    def __init__(self, model: nn.Module, num_classes: int, tapped: list[str], act_names: list[str], channels: int):
        from dnrt import ARR

        self.arr = ARR(model, num_classes, layers=tapped)
        self.aggregated: dict[str, list[torch.Tensor]] = {name: [] for name in tapped}
        self.acts: dict[str, list[torch.Tensor]] = {name: [] for name in act_names}
        self.used = {"token": "pooled"}
        modules = dict(model.named_modules())
        self.handles = [
            modules[name].register_forward_hook(_class_token_hook(model, self.acts[name], self.used, channels))
            for name in act_names
        ]

    def record(self) -> None:
        """Keep the aggregated responses of the forward pass just run."""
        for name, chunks in self.aggregated.items():
            chunks.append(self.arr.responses[name].float().cpu())

    def remove(self) -> None:
        """Remove every hook from the model."""
        self.arr.remove()
        for handle in self.handles:
            handle.remove()

    def arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The aggregated responses and the class tokens, one [n, d] array per layer."""
        return ([torch.cat(chunks).numpy() for chunks in self.aggregated.values()],
                [torch.cat(chunks).numpy() for chunks in self.acts.values()])


@torch.no_grad()
def collect_responses(checkpoint: str | Path, layers: Optional[Sequence[int]] = None, channels: int = 50,
                      data_root: Optional[str] = None, batches: int = 8, batch_size: int = 128,
                      device: str = "cpu") -> Responses:
    """Run a checkpoint's model on the first `batches` test batches and record the chosen layers' responses."""
    from dnrt.tool.rundir import load_run
    from dnrt.tool.data import build_dataset, dataset_info

    if channels < 1 or batches < 1 or batch_size < 1:
        raise DNRTError("--channels, --batches and --batch-size must be positive")
    model, own_arr, cfg = load_run(checkpoint, device)
    if own_arr is not None:
        own_arr.remove()
    cfg = cfg if data_root is None else {**cfg, "data_root": data_root}
    num_classes = dataset_info(cfg)["num_classes"]
    numbers, act_names, tapped = _taps(model, num_classes, layers)
    dataset = build_dataset(cfg, train=False)
    probe = _Probe(model, num_classes, tapped, act_names, channels)
    labels = []
    try:
        for _, (x, y) in zip(range(batches), DataLoader(dataset, batch_size=batch_size, shuffle=False)):
            model(x.to(device))
            probe.record()
            labels.append(y)
    finally:
        probe.remove()
    aggregated, acts = probe.arrays()
    names = getattr(dataset, "classes", None) or [str(k) for k in range(num_classes)]
    return Responses(run_label(Path(checkpoint).parent, cfg), "vit" if act_names else "net", probe.used["token"],
                     numbers, act_names or tapped, tapped, acts or [a[:, :channels] for a in aggregated], aggregated,
                     torch.cat(labels).numpy(), list(names))


def _pick_classes(classes: Optional[Sequence[str]], names: Sequence[str]) -> list[int]:
    """Class indices from numbers or names; default the paper's airplane, bird, dog (0, 2, 5) when they exist."""
    if not classes:
        return [0, 2, 5] if len(names) > 5 else list(range(min(3, len(names))))
    picked = []
    for c in classes:
        index = int(c) if str(c).isdigit() else (names.index(c) if c in names else -1)
        if not 0 <= index < len(names):
            raise DNRTError(f"unknown class {c!r}; classes are 0..{len(names) - 1}: {', '.join(names[:20])}")
        picked.append(index)
    return picked


def _violins(ax: plt.Axes, data: np.ndarray, color: str, title: str) -> None:
    """One distribution per channel: channel index on x, response value on y (Fig. 2's layout)."""
    if data.shape[0] < 2:
        raise DNRTError(f"{title}: fewer than two samples; give more --batches")
    parts = ax.violinplot(data, positions=np.arange(data.shape[1]), widths=0.8, showextrema=False)
    for body in parts["bodies"]:
        body.set_facecolor(color)
        body.set_alpha(0.6)
    ax.set_title(title, fontsize="medium")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("channel")
    ax.set_ylabel("response")
    ax.grid(alpha=0.3)


def _grid(rows: int, cols: int) -> tuple[plt.Figure, np.ndarray]:
    """A rows × cols grid of response panels, PANEL_SIZE inches each; own y axes (ARR can shrink the scale 20×)."""
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi=DPI,
                             squeeze=False)
    return fig, axes


def _channel_stats(data: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and quartiles: the numbers behind one violin panel."""
    q25, median, q75 = np.percentile(data, [25, 50, 75], axis=0)
    return {"mean": data.mean(axis=0).tolist(), "q25": q25.tolist(), "median": median.tolist(), "q75": q75.tolist()}


def response_stats(results: Sequence[Responses], classes: Sequence[int]) -> list[dict[str, Any]]:
    """The numbers behind the figures: per checkpoint and layer the concentration and per-channel statistics."""
    stats = []
    for res in results:
        layers = [{"layer": n, "channel_module": cm, "aggregated_module": am, "n": int(len(res.labels)),
                   "concentration": concentration(agg, res.labels), "channels": _channel_stats(ch)}
                  for n, cm, am, ch, agg in zip(res.layers, res.channel_modules, res.aggregated_modules,
                                                res.channels, res.aggregated)]
        width = res.channels[-1].shape[1]
        per_class = [{"class": k, "name": res.class_names[k], "layer": res.layers[-1],
                      "n": int((res.labels == k).sum()),
                      "channels": _channel_stats(res.aggregated[-1][res.labels == k, :width])} for k in classes]
        stats.append({"label": res.label, "kind": res.kind, "token": res.token, "layers": layers, "classes": per_class})
    return stats


def plot_responses(checkpoints: Sequence[str | Path], out: Optional[str | Path] = None,
                   layers: Optional[Sequence[int]] = None, classes: Optional[Sequence[str]] = None,
                   channels: int = 50, data_root: Optional[str] = None, batches: int = 8, batch_size: int = 128,
                   device: str = "cpu") -> Path:
    """Figure 2 for one or two checkpoints: per-channel responses per layer and per class; returns the JSON path."""
    results = [collect_responses(c, layers, channels, data_root, batches, batch_size, device) for c in checkpoints]
    picked = _pick_classes(classes, results[0].class_names)
    base = rundir.output_path(out, Path(checkpoints[0]).parent, "responses.png")
    fig, axes = _grid(len(results[0].layers), len(results))
    for col, res in enumerate(results):
        for row, (n, data, agg) in enumerate(zip(res.layers, res.channels, res.aggregated)):
            where = f"MLP activation, {res.token}" if res.kind == "vit" else res.channel_modules[row]
            ratio = concentration(agg, res.labels)["ratio"]
            _violins(axes[row, col], data, f"C{col}", f"{res.label}\nlayer {n} ({where}); within/between {ratio:.3f}")
    _save(fig, base.with_name(base.stem + "_channels.png"))
    fig, axes = _grid(len(picked), len(results))
    for col, res in enumerate(results):
        width = res.channels[-1].shape[1]
        for row, k in enumerate(picked):
            data = res.aggregated[-1][res.labels == k, :width]
            _violins(axes[row, col], data, f"C{col}",
                     f"{res.label}\nclass {res.class_names[k]}, aggregated response of layer {res.layers[-1]}")
    _save(fig, base.with_name(base.stem + "_classes.png"))
    path = base.with_suffix(".json")
    with rundir.output_error(path):
        rundir.write_json(path, response_stats(results, picked))
    return path


def _save(fig: plt.Figure, path: Path) -> None:
    """Lay out, write and close a figure (fixed size: no tight bounding box, so the pixel size is known)."""
    fig.tight_layout()
    try:
        with rundir.output_error(path):
            rundir.atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dnrt plot`: the `curves` and `responses` sub-commands."""
    sub = parser.add_subparsers(dest="plot", required=True, metavar="{curves,responses}")
    curves = sub.add_parser("curves", help="train/test cross-entropy, test top-1 and lr over epochs (Fig. 3)")
    curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    curves.add_argument("--out", default=None, help="PNG file or directory (default: the first run dir)")
    responses = sub.add_parser("responses", help="per-channel response distributions per layer and class (Fig. 2)")
    responses.add_argument("checkpoint", metavar="CHECKPOINT")
    responses.add_argument("--compare", default=None, metavar="CHECKPOINT", help="a second checkpoint, drawn beside")
    responses.add_argument("--layers", type=int, nargs="+", default=None,
                           help="1-based blocks / stages (default 1 4 10 where they exist, else all)")
    responses.add_argument("--classes", nargs="+", default=None, help="class numbers or names (default 0 2 5)")
    responses.add_argument("--channels", type=int, default=50, help="first N channels drawn (default 50)")
    responses.add_argument("--data-root", default=None, help="dataset folder (default: the run's data_root)")
    responses.add_argument("--batches", type=int, default=8, help="test batches to run (default 8)")
    responses.add_argument("--batch-size", type=int, default=128)
    responses.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    responses.add_argument("--out", default=None, help="file stem or directory (default: beside the checkpoint)")


def _print_concentration(path: Path) -> None:
    """Print each layer's within/between ratio (lower: responses more concentrated per class)."""
    for entry in json.loads(path.read_text()):
        for layer in entry["layers"]:
            c = layer["concentration"]
            print(f"{entry['label']}  layer {layer['layer']}: within {c['within']:.4f} / between "
                  f"{c['between']:.4f} = {c['ratio']:.3f}")


def run(args: argparse.Namespace) -> int:
    """Run `dnrt plot curves` or `dnrt plot responses`."""
    if args.plot == "curves":
        path = plot_curves(args.run_dirs, args.out)
        print(f"written: {path} and {path.with_suffix('.csv').name}")
        return 0
    checkpoints = [args.checkpoint] + ([args.compare] if args.compare else [])
    path = plot_responses(checkpoints, args.out, args.layers, args.classes, args.channels, args.data_root,
                          args.batches, args.batch_size, args.device)
    _print_concentration(path)
    print(f"written: {path.with_name(path.stem + '_channels.png')}, {path.stem}_classes.png and {path.name}")
    return 0
