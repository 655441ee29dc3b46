"""What starting a run in a folder means: take the folder (its lock), then continue the unfinished run there,
report a finished one, refuse another config or another program's folder, or replace dnrt's files
(`--overwrite True`)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from dnrt.errors import DNRTError
from dnrt.tool.rundir.checkpoint import load_checkpoint
from dnrt.tool.rundir.config_json import NEUTRAL_KEYS, changed_keys, describe, is_dnrt_config, read_config, \
    result_changes
from dnrt.tool.rundir.files import CONFIG, LATEST, usable_folder
from dnrt.tool.rundir.lock import RunLock
from dnrt.tool.rundir.log import check_log, first_epoch, read_log
from dnrt.tool.rundir.manifest import remove_run


@contextmanager
def owned(folder: str | Path, owner: bool = True) -> Iterator[Optional[RunLock]]:
    """The run folder, created if missing and locked for this process while the block runs (`owner`: rank 0 under
    torchrun; the other ranks hold nothing); a folder it created and nothing wrote into is removed again."""
    if not owner:
        yield None
        return
    created = not Path(folder).exists()
    usable_folder(folder)
    with RunLock(folder) as lock:
        try:
            yield lock
        except BaseException:
            if created:  # a run refused or failed before writing anything leaves no empty folder behind
                lock.discard_folder()
            raise


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

    - a config.json another program wrote: refuse, also with `--overwrite True`;
    - `--overwrite True`: delete the files dnrt wrote (refusing when the folder holds others), start afresh;
    - a run of another config: refuse, naming the keys that differ;
    - a finished run of this config: report its best and last top-1, change nothing;
    - an unfinished one: continue from checkpoint.pth (`resumable`, i.e. runs that write checkpoints), else anew;
      without checkpoints a larger `epochs` is another config too (the run would start anew).
    An explicit -r checkpoint is kept: train() checks it against the config.
    """
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise DNRTError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    saved_config = read_config(out) if (out / CONFIG).is_file() else None
    if saved_config is not None and not is_dnrt_config(saved_config):
        raise DNRTError(f"{out / CONFIG} was not written by dnrt: {out} is not a dnrt run folder and dnrt changes "
                        f"nothing in it; choose another output_dir")
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
    elif saved_config is not None:
        saved = saved_config
        done = len(read_log(out)) if not resumable else 0
    else:
        return Plan("resume", cfg["resume"]) if cfg["resume"] else Plan("fresh")
    changes = result_changes(saved, cfg) if resumable else changed_keys(saved, cfg, NEUTRAL_KEYS)
    if changes:
        raise DNRTError(f"{out} holds a run of another config ({describe(changes)}); choose another output_dir, "
                        f"or give --overwrite True to replace that run")
    if cfg["resume"]:
        return Plan("resume", cfg["resume"])
    note = check_log(out, done, str(latest), first_epoch(out, state.get("resumes", []))) \
        if resumable and latest.is_file() else None
    if done >= cfg["epochs"]:
        best, last = best_and_last(read_log(out))
        more = "more --epochs continues it, " if resumable else ""
        return Plan("finished", message=f"{out} holds a finished run of this config ({done} epochs): best top-1 "
                                        f"{_percent(best)}, last {_percent(last)}; nothing to do ({more}"
                                        f"--overwrite True trains it again)")
    if resumable and latest.is_file():
        return Plan("resume", str(latest), f"continuing the unfinished run in {out} at epoch {done} of "
                                           f"{cfg['epochs']} from {LATEST}" + (f"\n{note}" if note else ""))
    return Plan("fresh")
