"""The one table of config keys: each key's default, accepted values, one-line meaning and group.

Config checking (`dnrt.tool.config`), `--help` (`dnrt.tool.cli`) and the docs' key tables (docs/hooks.py puts
`markdown()` into docs/tool.md when the site is built; `python -m dnrt.tool.keys` prints it) all read this table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

GROUPS = {
    "data": "Data",
    "model": "Model",
    "loss": "Loss",
    "optimisation": "Optimisation",
    "schedule": "Learning-rate schedule",
    "runtime": "Runtime",
    "output": "Output and resuming",
    "authors": "Authors' tool",
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Check:
    """What a key accepts: `accept` returns the value (or its canonical form) or raises ValueError/TypeError."""

    expected: str  # "an integer ≥ 1": the message after "must be"
    accept: Callable[[Any], Any]
    flag: bool = False  # a bare --key on the command line means True
    many: bool = False  # a command-line value may be several words: --milestones 30 60

    def __call__(self, value: Any) -> Any:
        try:
            return self.accept(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.expected}") from None


def _require(ok: bool) -> None:
    if not ok:
        raise ValueError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None) -> Check:
    bounds = f" ≥ {low}" if low is not None else ""
    bounds += f" and ≤ {high}" if high is not None else ""

    def accept(value: Any) -> int:
        _require(_is_int(value) and (low is None or value >= low) and (high is None or value <= high))
        return value

    return Check(f"an integer{bounds}", accept)


def number(low: float = 0.0, strict: bool = False, high: float | None = None) -> Check:
    """A finite int or float ≥ low (> low when strict), ≤ high when given; returned as given."""
    bounds = f" {'>' if strict else '≥'} {low:g}" + (f" and ≤ {high:g}" if high is not None else "")

    def accept(value: Any) -> float:
        _require(_is_number(value) and (value > low if strict else value >= low) and (high is None or value <= high))
        return value

    return Check(f"a number{bounds}", accept)


def boolean() -> Check:
    def accept(value: Any) -> bool:
        _require(isinstance(value, bool))
        return value

    return Check("True or False", accept, flag=True)


def choice(*values: Any, aliases: dict[Any, Any] | None = None) -> Check:
    """One of `values`; an alias (the authors' name for a value) is replaced by the value it stands for."""
    aliases = aliases or {}
    names = ", ".join(repr(v) for v in (*values, *aliases))

    def accept(value: Any) -> Any:
        value = aliases.get(value, value) if isinstance(value, (str, type(None))) else value
        _require(any(value is v or (type(value) is type(v) and value == v) for v in values))
        return value

    return Check(f"one of {names}", accept, flag=True in values)


def name() -> Check:
    def accept(value: Any) -> str:
        _require(isinstance(value, str) and value != "")
        return value

    return Check("a non-empty string", accept)


def optional(check: Check, none_means: str = "None") -> Check:
    """None or what `check` accepts."""
    return Check(f"{none_means} or {check.expected}", lambda v: None if v is None else check.accept(v),
                 flag=check.flag, many=check.many)


def mapping() -> Check:
    def accept(value: Any) -> dict:
        _require(isinstance(value, dict) and all(isinstance(k, str) for k in value))
        json.dumps(value)  # TypeError for values a config.json cannot hold
        return value

    return Check("a dict of plain values with string keys", accept)


def milestones() -> Check:
    def accept(value: Any) -> list[int]:
        value = [value] if _is_int(value) else list(value)
        _require(len(value) > 0 and all(_is_int(m) and m >= 1 for m in value) and value == sorted(set(value)))
        return value

    return Check("a list of increasing epochs ≥ 1", accept, many=True)


def layer_names() -> Check:
    def accept(value: Any) -> Any:
        if value == "auto":
            return value
        value = [value] if isinstance(value, str) else list(value)
        _require(len(value) > 0 and all(isinstance(v, str) and v for v in value))
        return value

    return Check("'auto' or a list of module names", accept, many=True)


def device() -> Check:
    def accept(value: Any) -> str:
        import torch

        _require(isinstance(value, str))
        torch.device(value)  # RuntimeError for a malformed name
        return value

    def checked(value: Any) -> str:
        try:
            return accept(value)
        except RuntimeError:
            raise ValueError from None

    return Check("a torch device name ('cpu', 'cuda', 'cuda:1')", checked)


def activation() -> Check:
    def accept(value: Any) -> str:
        from dnrt import ACTIVATIONS

        _require(value in ACTIVATIONS)
        return value

    from dnrt import ACTIVATIONS

    return Check(f"one of {', '.join(map(repr, ACTIVATIONS))}", accept)


def optimizer() -> Check:
    def accept(value: Any) -> str:
        from timm.optim import list_optimizers

        _require(isinstance(value, str) and value.lower() in list_optimizers())
        return value

    return Check("a timm.optim optimizer name (adamw, sgd, adam, rmsprop, lamb, ...)", accept)


def model_kwargs() -> Check:
    """A dict for the model's constructor; `act_layer` (the authors' way to choose the activation) is recorded
    by the name of its class, e.g. 'dnrt.compat.RAA'."""
    base = mapping()

    def accept(value: Any) -> dict:
        _require(isinstance(value, dict))
        if "act_layer" in value:
            from dnrt.compat import act_layer_name

            value = {**value, "act_layer": act_layer_name(value["act_layer"])}
        return base.accept(value)

    return Check("a dict of plain values with string keys; act_layer: a class of dnrt.compat, torch.nn.GELU or "
                 "torch.nn.ReLU", accept)


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    check: Check
    help: str
    group: str
    short: str | None = None  # the authors' one-letter option, e.g. '-b'


def _keys(*rows: tuple) -> dict[str, Key]:
    return {row[0]: Key(*row) for row in rows}


KEYS: dict[str, Key] = _keys(
    # data
    ("dataset", "cifar100", name(), "dataset name (docs/models-data.md lists them)", "data", "-d"),
    ("data_root", "./data", name(), "folder the dataset lives in (and downloads to)", "data"),
    ("image_size", None, optional(integer(1), "None (the dataset's own size)"),
     "input side in pixels; digits and fake are resized to it", "data"),
    ("imbalance_factor", 100, number(1), "β of the long-tailed `<name>_lt` datasets", "data"),
    ("train_subset", None, optional(integer(1), "None (every training image)"),
     "train on the first N // classes images of each class only (a smaller, balanced training set)", "data"),
    ("no_aug", None, optional(boolean(), "None (True for digits, fake, mnist, fashion_mnist)"),
     "True: resize and normalise only; False: the paper's timm augmentation", "data"),
    ("train_aug_kwargs", {}, mapping(), "overrides of timm.data.create_transform(is_training=True)", "data"),
    ("eval_aug_kwargs", {}, mapping(), "overrides of timm.data.create_transform(is_training=False)", "data"),
    ("num_workers", None, optional(integer(0), "None (the tool chooses: 0 for in-memory datasets, else "
                                                 "min(usable cores, batch_size, 8))"),
     "data-loader worker processes; the chosen number is logged and kept in config.json", "data"),
    ("pin_memory", True, boolean(), "pinned host memory for the data loaders (only when CUDA is used)", "data"),
    ("drop_last", None, optional(boolean(), "None (drop a last partial batch unless it is the only one)"),
     "drop the last incomplete training batch of each epoch", "data"),
    # model
    ("model", "vit_tiny_patch4_32", name(), "model name (docs/models-data.md lists them)", "model", "-m"),
    ("model_lib", None, choice(None, "timm", "torchvision", aliases={"default": None}),
     "None: the tool's models; 'timm'/'torchvision': any model of that library; 'default' is the authors' "
     "name for None", "model"),
    ("model_kwargs", {}, model_kwargs(),
     "constructor arguments; override the derived num_classes/in_chans/img_size; act_layer=RAA etc. "
     "(from dnrt.compat) chooses the activation as in the authors' configs", "model"),
    ("act", None, optional(activation(), "None (keep the model's own)"),
     "every activation becomes this dnrt.make_activation name, via dnrt.convert(replace='all')", "model"),
    ("sync_bn", False, boolean(), "SyncBatchNorm when several processes train", "model"),
    ("pretrained", False, boolean(), "start from the model library's own pretrained weights", "model"),
    ("pretrained_file", None, optional(name()),
     "start from this file: a state_dict, a timm/torchvision checkpoint or a dnrt checkpoint", "model"),
    ("compile", False, choice(False, True, *COMPILE_MODES),
     "torch.compile the model: True or a mode name", "model"),
    # loss
    ("criterion", "ce", choice("ce", "arr", aliases={"ce_arr": "arr"}),
     "'ce': cross-entropy; 'arr': cross-entropy + ARR ('ce_arr' is the authors' name)", "loss"),
    ("arr_loss_coef", 20.0, number(0), "ARR's weight λ", "loss"),
    ("arr_layers", None, optional(layer_names(), "None ('auto')"),
     "modules whose outputs ARR aggregates", "loss"),
    ("arr_momentum", 0.1, number(0, strict=True, high=1.0), "momentum of ARR's class means", "loss"),
    ("arr_order", "reference", choice("reference", "paper"),
     "memory update order: the authors' code ('reference') or the paper's Eq. 4 ('paper')", "loss"),
    ("arr_layer_weighting", "paper", choice("paper", "reference"),
     "how ARR averages its per-layer losses: over the layers ('paper') or, as the authors' code, over the layers "
     "of each width and then over the widths ('reference', what configs in the authors' form get)", "loss"),
    ("need_targets", False, boolean(), "kept from the authors' configs; ARR here takes targets in arr.loss()",
     "loss"),
    # optimisation
    ("batch_size", 256, integer(1), "images per process and step", "optimisation", "-b"),
    ("lr", 5e-4 * 256 / 512, number(0, strict=True), "peak learning rate", "optimisation"),
    ("epochs", 300, integer(1), "training epochs", "optimisation"),
    ("optimizer", "adamw", optimizer(), "timm.optim.create_optimizer_v2 name", "optimisation"),
    ("weight_decay", 0.05, number(0), "weight decay (not on biases and norms)", "optimisation"),
    ("momentum", 0.9, number(0, high=1.0), "momentum of SGD-like optimizers", "optimisation"),
    ("clip_max_norm", 1.0, optional(number(0), "None (off)"), "gradient-norm clipping; 0 or None: off",
     "optimisation"),
    ("amp", True, choice(True, False, "bf16"),
     "True: float16 autocast + GradScaler on CUDA (off on CPU); 'bf16': bfloat16 autocast anywhere", "optimisation"),
    # schedule
    ("scheduler", "cosine", choice("cosine", "step", "multistep", "tanh", "poly"),
     "learning-rate schedule, stepped every iteration", "schedule"),
    ("warmup_epochs", 20, integer(0), "linear warm-up epochs from warmup_lr (cosine, tanh, poly)", "schedule"),
    ("warmup_steps", 0, integer(0), "warm-up in iterations instead of epochs (not both)", "schedule"),
    ("warmup_lr", 1e-6, number(0), "learning rate the warm-up starts from", "schedule"),
    ("min_lr", 1e-5, number(0), "floor of the cosine, tanh and poly schedules", "schedule"),
    ("step_size", None, optional(integer(1)), "step: epochs between drops by gamma", "schedule"),
    ("milestones", None, optional(milestones()), "multistep: epochs at which the lr drops by gamma",
     "schedule"),
    ("gamma", 0.1, number(0, strict=True), "step, multistep: factor of each drop", "schedule"),
    ("lr_drop", -1, integer(-1), "step: step_size when that is None (-1: unset)", "schedule"),
    ("drop_lr_now", False, boolean(), "on resume, multiply the learning rate by 0.1 from the resume point",
     "schedule"),
    ("start_epoch", 0, integer(0), "epoch a fresh run starts at (a resume takes the checkpoint's)", "schedule"),
    # runtime
    ("seed", 42, integer(0, 2**32 - 1), "seed of Python, NumPy and torch (reseeded every epoch)", "runtime"),
    ("device", None, optional(device(), "None (CUDA when available)"),
     "device; 'cuda' without CUDA falls back to the CPU with one line", "runtime"),
    ("strategy", "ddp", choice("ddp", "fsdp"),
     "several processes: 'ddp' (DistributedDataParallel) or 'fsdp' (FSDP2 fully_shard of each block, then the "
     "model); checkpoints hold full state dicts either way, so they load anywhere", "runtime"),
    ("find_unused_params", False, boolean(), "DistributedDataParallel(find_unused_parameters=...)", "runtime"),
    ("no_dist", False, boolean(), "refuse to run under torchrun with several processes", "runtime"),
    ("world_size", 1, integer(1), "accepted; torchrun's WORLD_SIZE decides", "runtime"),
    ("dist_url", "env://", name(), "accepted; torchrun's environment (env://) decides", "runtime"),
    ("dist_backend", "nccl", choice("nccl", "gloo"), "accepted; NCCL on CUDA, Gloo on CPU", "runtime"),
    ("local_rank", -1, integer(-1), "accepted; torchrun's LOCAL_RANK decides", "runtime"),
    # output
    ("output_root", "./runs", name(), "parent of the default output_dir", "output"),
    ("output_dir", None, optional(name(), "None (output_root/<config name>)"), "run folder", "output", "-o"),
    ("save_interval", 50, integer(1), "epochs between numbered checkpoints", "output"),
    ("eval_interval", 1, integer(1), "epochs between evaluations", "output"),
    ("print_freq", 50, integer(1), "iterations between progress lines (when stderr is not a terminal)", "output"),
    ("resume", None, optional(name()), "checkpoint to resume from (or to evaluate with eval)", "output", "-r"),
    ("eval", False, boolean(), "only evaluate the resume checkpoint", "output"),
    ("overwrite", False, boolean(), "replace a different run already in output_dir", "output"),
    ("note", None, optional(name()), "a remark kept in config.json and printed with the summary", "output"),
    # kept from the authors' tool
    ("evaluator", "default", choice("default"), "the authors' evaluator name; the one evaluation here", "authors"),
    ("no_pretrain", True, boolean(), "the authors' negation of pretrained: False means pretrained=True",
     "authors"),
    ("load_pos", None, optional(name()), "accepted and ignored, as by the authors' DNRT tool", "authors"),
    ("save_pos", None, optional(name()), "accepted and ignored, as by the authors' DNRT tool", "authors"),
)


def _default_text(key: Key) -> str:
    if key.name == "lr":
        return "2.5e-4"
    return f"`{key.default!r}`"


def markdown() -> str:
    """The docs' key tables, one per group."""
    parts = []
    for group, title in GROUPS.items():
        rows = [f"| `{k.name}`{f' (`{k.short}`)' if k.short else ''} | {_default_text(k)} | {k.check.expected} "
                f"| {k.help} |" for k in KEYS.values() if k.group == group]
        parts.append(f"**{title}**\n\n| key | default | accepts | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
