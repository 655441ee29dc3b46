"""The run folder: its files (config.json, log.txt, eval.json, checkpoints), their names and formats, atomic writes,
and what starting a run in a folder that already holds one means (continue, report, refuse or replace)."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional

from dnrt.errors import DNRTError

CONFIG, LOG, EVAL, LATEST, BEST = "config.json", "log.txt", "eval.json", "checkpoint.pth", "checkpoint_best.pth"
TEMP_SUFFIX = ".tmp"
# how a run is asked for, not what it is: never compared, never recorded as a change
COMMAND_KEYS = ("resume", "eval", "overwrite")
# keys that leave the result alone: they may differ between the commands that train one run (recorded on resume)
NEUTRAL_KEYS = ("output_dir", "data_root", "num_workers", "device", "print_freq", "save_interval", "eval_interval",
                "compile", "pin_memory", "note", "find_unused_params", "start_epoch", "drop_lr_now", "world_size",
                "dist_url", "dist_backend", "local_rank", "load_pos", "save_pos", "output_root")


def numbered(epoch: int) -> str:
    """The name of the checkpoint kept for `epoch` (0-based) every save_interval epochs."""
    return f"checkpoint_{epoch:04d}.pth"


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the folder's entry is data of its own)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, fsync, rename, fsync the folder: a killed
    process leaves the old file or the new one, never a torn one. OSError (full disk, no permission) propagates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that it is strict JSON (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(data: Any, indent: Optional[int] = None) -> str:
    """Strict JSON (no NaN/Infinity tokens: non-finite numbers become null)."""
    return json.dumps(finite(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DNRTError(f"{path}: not valid JSON ({e.msg})") from None


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's config.json (with its `resumes` list); an empty dict when the folder has none."""
    path = Path(run_dir) / CONFIG
    return read_json(path) if path.is_file() else {}


def write_config(run_dir: str | os.PathLike, cfg: dict[str, Any], resumes: list[dict[str, Any]]) -> None:
    """config.json: the config that runs now and, per resume, the epoch it started at and the keys it changed."""
    write_json(Path(run_dir) / CONFIG, {**cfg, "resumes": resumes})


def read_log(run_dir: str | os.PathLike, required: bool = False) -> list[dict[str, Any]]:
    """log.txt's rows in epoch order ([] without a log, unless `required`); a repeated epoch keeps its last line."""
    run = Path(run_dir)
    log = run / LOG
    if not log.is_file():
        if not required:
            return []
        if not run.is_dir():
            raise DNRTError(f"run directory not found: {run}")
        raise DNRTError(f"no {LOG} in {run}: not a run directory written by `dnrt train`")
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DNRTError(f"{log}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise DNRTError(f"{log}:{number}: a log line needs an 'epoch' key")
        rows[int(row["epoch"])] = row
    if required and not rows:
        raise DNRTError(f"{log} holds no epochs yet")
    return [rows[e] for e in sorted(rows)]


def log_lines(run_dir: Path, before_epoch: int) -> list[str]:
    """The log's lines of the epochs before `before_epoch`, byte for byte."""
    log = run_dir / LOG
    if not log.is_file():
        return []
    return [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < before_epoch]


def start_log(run_dir: Path, start_epoch: int) -> None:
    """Keep the lines of the epochs before `start_epoch` (none for a fresh run): a resumed run continues its log."""
    write_text(run_dir / LOG, "".join(line + "\n" for line in log_lines(run_dir, start_epoch)))


def append_log(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row as a strict JSON line (the whole file rewritten atomically: it is small)."""
    log = run_dir / LOG
    old = log.read_text() if log.is_file() else ""
    write_text(log, old + dumps(row) + "\n")


def write_eval(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """eval.json of `dnrt eval` (strict JSON)."""
    out = usable_folder(out_dir)
    path = out / EVAL
    try:
        write_json(path, metrics)
    except OSError as e:
        raise DNRTError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def usable_folder(folder: str | os.PathLike, key: str = "output_dir") -> Path:
    """`folder`, created if missing; a path that is a file, or one that cannot be created, is a DNRTError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DNRTError(f"{key} {folder} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DNRTError(f"cannot create {key} {folder}: {e.strerror or e}") from None
    return folder


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files a killed process left behind (atomic_write's `.<name>.*.tmp`)."""
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def remove_run(folder: Path) -> bool:
    """Delete the files of the run in `folder` (only the files a run writes); True when there was one."""
    names = [CONFIG, LOG, EVAL, *(p.name for p in folder.glob("checkpoint*.pth"))]
    found = [folder / n for n in names if (folder / n).is_file()]
    for path in found:
        path.unlink()
    if (folder / "tensorboard").is_dir():
        shutil.rmtree(folder / "tensorboard")
    remove_temp_files(folder)
    return bool(found)


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


def best_and_last(rows: list[dict[str, Any]]) -> tuple[Optional[float], Optional[float]]:
    """The best and the last evaluated test top-1 of a log."""
    acc = [r["test_acc1"] for r in rows if r.get("test_acc1") is not None]
    return (max(acc), acc[-1]) if acc else (None, None)


@dataclass(frozen=True)
class Plan:
    """What a run started in its output_dir does: `action` 'fresh', 'resume' (from `checkpoint`) or 'finished'."""

    action: str
    checkpoint: Optional[str] = None
    message: Optional[str] = None


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}%"


def plan_run(cfg: dict[str, Any], resumable: bool = True) -> Plan:
    """Decide what a run in cfg['output_dir'] does, given what the folder holds (rank 0 only: it may delete files).

    - `--overwrite True`: delete the old run's files, start afresh;
    - a run of another config: refuse, naming the keys that differ;
    - a finished run of this config: report its best and last top-1, change nothing;
    - an unfinished one: continue from checkpoint.pth (`resumable`, i.e. runs that write checkpoints), else anew;
      without checkpoints a larger `epochs` is another config too (the run would start anew).
    An explicit -r checkpoint is kept: train() checks it against the config.
    """
    from dnrt.tool.checkpoint import load_checkpoint

    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise DNRTError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    if cfg["overwrite"]:
        if cfg["resume"]:
            raise DNRTError("--overwrite True starts the run in output_dir anew; it cannot be combined with -r")
        replaced = out.is_dir() and remove_run(out)
        return Plan("fresh", message=f"replacing the run in {out} (--overwrite True)" if replaced else None)
    latest = out / LATEST
    if resumable and latest.is_file():
        try:
            state = load_checkpoint(latest)
        except DNRTError as e:
            raise DNRTError(f"{e}; another output_dir, or --overwrite True to replace that run") from None
        saved, done = state.get("config") or {}, state["epoch"] + 1
    elif (out / CONFIG).is_file():
        saved = read_config(out)
        done = len(read_log(out)) if not resumable else 0
    else:
        return Plan("resume", cfg["resume"]) if cfg["resume"] else Plan("fresh")
    changes = result_changes(saved, cfg) if resumable else changed_keys(saved, cfg, NEUTRAL_KEYS)
    if changes:
        raise DNRTError(f"{out} holds a run of another config ({describe(changes)}); choose another output_dir, "
                        f"or give --overwrite True to replace that run")
    if cfg["resume"]:
        return Plan("resume", cfg["resume"])
    if done >= cfg["epochs"]:
        best, last = best_and_last(read_log(out))
        more = "more --epochs continues it, " if resumable else ""
        return Plan("finished", message=f"{out} holds a finished run of this config ({done} epochs): best top-1 "
                                        f"{_percent(best)}, last {_percent(last)}; nothing to do ({more}"
                                        f"--overwrite True trains it again)")
    if resumable and latest.is_file():
        return Plan("resume", str(latest), f"continuing the unfinished run in {out} at epoch {done} of "
                                           f"{cfg['epochs']} from {LATEST}")
    return Plan("fresh")
