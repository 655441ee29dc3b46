"""config.json: the config a run trains by and its `resumes`; which keys make another run (and which do not)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dnrt.tool.rundir.files import CONFIG, read_json, write_json

# how a run is asked for, not what it is: never compared, never recorded as a change
COMMAND_KEYS = ("resume", "eval", "overwrite")
# keys that leave the result alone: they may differ between the commands that train one run (recorded on resume)
NEUTRAL_KEYS = ("output_dir", "data_root", "num_workers", "device", "print_freq", "save_interval", "eval_interval",
                "compile", "pin_memory", "note", "find_unused_params", "strategy", "start_epoch", "drop_lr_now",
                "world_size", "dist_url", "dist_backend", "local_rank", "load_pos", "save_pos", "output_root")
# keys every config.json of dnrt holds: a config.json without them was written by another program
SIGNATURE = ("model", "dataset", "act", "criterion", "epochs", "output_dir", "resumes")


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's config.json (with its `resumes` list); an empty dict when the folder has none."""
    path = Path(run_dir) / CONFIG
    return read_json(path) if path.is_file() else {}


def write_config(run_dir: str | os.PathLike, cfg: dict[str, Any], resumes: list[dict[str, Any]]) -> None:
    """config.json: the config that runs now and, per resume, the epoch it started at and the keys it changed."""
    write_json(Path(run_dir) / CONFIG, {**cfg, "resumes": resumes})


def is_dnrt_config(saved: Any) -> bool:
    """Whether a config.json's content is one dnrt wrote (a dict holding the keys every dnrt config.json has)."""
    return isinstance(saved, dict) and all(k in saved for k in SIGNATURE)


def changed_keys(saved: dict[str, Any], cfg: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every key whose value differs; a key missing from an older config counts
    as its default."""
    from dnrt.tool.config import DEFAULTS, jsonable

    new = jsonable(cfg)
    skip = {*COMMAND_KEYS, *ignore, "resumes", "converted_activations"}
    keys = [k for k in {**saved, **new} if k not in skip]
    old_value = {k: saved.get(k, DEFAULTS.get(k)) for k in keys}
    new_value = {k: new.get(k, DEFAULTS.get(k)) for k in keys}
    return {k: (old_value[k], new_value[k]) for k in keys if old_value[k] != new_value[k]}


def describe(changes: dict[str, tuple]) -> str:
    """`key: old -> new; ...` for a one-line message."""
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def result_changes(saved: dict[str, Any], cfg: dict[str, Any]) -> dict[str, tuple]:
    """The changes that make `cfg` another run than `saved`: all but the neutral keys and a larger `epochs`."""
    changes = changed_keys(saved, cfg, NEUTRAL_KEYS)
    old, new = changes.get("epochs", (0, 0))
    if new > old:
        del changes["epochs"]
    return changes
