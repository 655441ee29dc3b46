"""Python config files as in the authors' tool: module-level variables, `from _base_ import *`, CLI overrides."""
from __future__ import annotations

import ast
import difflib
import json
import runpy
import sys
import types
from pathlib import Path
from typing import Any, Sequence

from dnrt.errors import DNRTError

DEFAULTS: dict[str, Any] = {
    # data
    "dataset": "cifar100",
    "data_root": "./data",
    "image_size": None,  # None: the dataset's own size
    "imbalance_factor": 100,  # for *_lt datasets
    "no_aug": None,  # None: True for digits, fake, mnist, fashion_mnist; the paper's recipe otherwise
    "train_aug_kwargs": {},  # overrides of timm.data.create_transform(is_training=True)
    "eval_aug_kwargs": {},  # overrides of timm.data.create_transform(is_training=False)
    "num_workers": 4,
    # model
    "model": "vit_tiny_patch4_32",
    "model_lib": None,  # None: the tool's registry; 'timm' / 'torchvision': any model of that library
    "model_kwargs": {},
    "act": None,  # None: keep the model's own activations; else a name of dnrt.ACTIVATIONS
    "sync_bn": False,
    # loss
    "criterion": "ce",  # 'ce' or 'arr' (cross-entropy + ARR)
    "arr_loss_coef": 20.0,
    "arr_layers": None,  # None: "auto"
    "arr_momentum": 0.1,
    "arr_order": "reference",
    "need_targets": False,  # kept from the authors' configs; ARR here takes targets in arr.loss()
    # optimisation
    "batch_size": 256,  # per process
    "lr": 5e-4 * 256 / 512,
    "epochs": 300,
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "momentum": 0.9,  # for SGD
    "scheduler": "cosine",
    "warmup_epochs": 20,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "clip_max_norm": 1.0,
    "amp": True,  # True: float16 autocast + GradScaler on CUDA; 'bf16': bfloat16 autocast on any device
    "seed": 42,
    "device": None,  # None: CUDA when available
    # output
    "output_dir": None,  # None: ./runs/<config file name>
    "save_interval": 50,
    "eval_interval": 1,
    "print_freq": 50,
    "resume": None,
    "eval": False,
    "overwrite": False,  # True: replace the run output_dir holds (else a run of another config there is refused)
    "compile": False,  # True or a torch.compile mode name: compile the model and the loss
}


def _public_values(namespace: dict[str, Any]) -> dict[str, Any]:
    """The config's settings: public module-level names that are not modules, functions or classes."""
    skip = (types.ModuleType, types.FunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skip)}


def _forget_modules_of(folder: Path) -> None:
    """Drop config modules imported from `folder` (e.g. `_base_`), so another folder's namesake loads afresh."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).parent == folder:
            del sys.modules[name]


def _run_file(path: Path) -> dict[str, Any]:
    """Execute a config file with its own folder importable, so `from _base_ import *` finds its sibling."""
    folder = path.parent
    sys.path.insert(0, str(folder))
    sys.modules.pop("_base_", None)  # a _base_ of another folder may be cached
    try:
        return runpy.run_path(str(path))
    except DNRTError:
        raise
    except Exception as e:
        raise DNRTError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(folder))
        _forget_modules_of(folder)


def check_keys(keys: Sequence[str], source: str) -> None:
    """Raise a DNRTError naming the closest valid keys for the first unknown key."""
    for key in keys:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(DEFAULTS)}"
            raise DNRTError(f"unknown config key '{key}' in {source}{hint}")


def parse_value(text: str) -> Any:
    """A command-line value as a Python literal where it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and bare `--flag` (True) into a dict."""
    result: dict[str, Any] = {}
    items = list(overrides)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) == 2:
            raise DNRTError(f"expected an option like --key value, got '{token}'")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            result[key] = parse_value(value)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            i += 1
            result[key] = parse_value(items[i])
        else:
            result[key] = True
        i += 1
    return result


def jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), for config.json and checkpoints."""
    try:
        return json.loads(json.dumps(cfg))
    except TypeError as e:
        raise DNRTError(f"config values must be plain Python literals: {e}") from None


def resolve(values: dict[str, Any], name: str = "run") -> dict[str, Any]:
    """DEFAULTS updated with `values`, with the derived defaults (output_dir) filled in."""
    check_keys(list(values), name)
    cfg = {**DEFAULTS, **values}
    if cfg["output_dir"] is None:
        cfg["output_dir"] = str(Path("runs") / name)
    return jsonable(cfg)


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a python config file, apply command-line overrides, check every key and return the full config."""
    file = Path(path)
    if not file.is_file():
        raise DNRTError(f"config file not found: {path}")
    values = _public_values(_run_file(file.resolve()))
    check_keys(list(values), str(path))
    extra = parse_overrides(overrides)
    check_keys(list(extra), "the command line")
    return resolve({**values, **extra}, file.stem)
