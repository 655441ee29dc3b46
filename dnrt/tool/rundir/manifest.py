"""manifest.json: the files a run of dnrt wrote into its folder, so that `--overwrite True` removes those and
nothing else. Files the read-only commands write beside a run by default (eval.json, curves.*, compare.*,
responses*, exported checkpoints) and the launcher's job.json count as dnrt's too. A folder from before the
manifest (older dnrt) counts the file names dnrt has always written: config.json, log.txt, eval.json,
checkpoint.pth, checkpoint_best.pth, checkpoint_NNNN.pth and tensorboard/events.out.tfevents.*."""
from __future__ import annotations

import fnmatch
import re
import shutil
from pathlib import Path

from dnrt.errors import DNRTError
from dnrt.tool.rundir.files import (BEST, CONFIG, EVAL, JOB, LATEST, LOCK, LOG, MANIFEST, TEMP_SUFFIX, TENSORBOARD,
                                    read_json, write_json)

# what `dnrt eval|plot|compare|export` write into a run folder by default, and the launcher's job record
OUTPUTS = (EVAL, JOB, "curves.png", "curves.csv", "compare.md", "compare.json", "responses.json", "responses_*.png",
           "checkpoint*.onnx", "checkpoint*.pt2", "checkpoint*.pt")
# what every dnrt run wrote before the manifest existed
BEFORE_MANIFEST = (CONFIG, LOG, LATEST, BEST, "checkpoint_[0-9][0-9][0-9][0-9].pth",
                   f"{TENSORBOARD}/events.out.tfevents.*")
SHOWN = 5


def written(folder: Path) -> list[str] | None:
    """The files the manifest lists (paths relative to the folder), None when the folder has no manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise DNRTError(f"{path} is not a manifest of dnrt (a JSON object with a 'files' list)")
    return [str(name) for name in data["files"]]


def record(folder: Path, *names: str) -> None:
    """Add `names` (relative paths) to the manifest, before the files are written: a run killed in between leaves
    a listed file missing, never an unlisted file of its own."""
    known = written(folder) or []
    new = [n for n in names if n not in known]
    if new:
        write_json(folder / MANIFEST, {"files": sorted(known + new)})


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _temporary_of(name: str, ours: set[str]) -> bool:
    """Whether `name` is a temporary file atomic_write left for one of `ours` (`.NAME.xxxx.tmp`)."""
    match = re.fullmatch(rf"(.*/)?\.(.+)\.[^./]+{re.escape(TEMP_SUFFIX)}", name)
    return bool(match) and f"{match.group(1) or ''}{match.group(2)}" in ours


def split_files(folder: Path) -> tuple[list[str], list[str]]:
    """(dnrt's files, the others) in `folder`, as relative paths; the lock file is neither (it is never removed:
    a process waiting on it would lock a file no longer in the folder)."""
    listed = written(folder)
    patterns = OUTPUTS + (BEFORE_MANIFEST if listed is None else ())
    ours_listed = set(listed or []) | {MANIFEST}
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    mine = {f for f in files if f in ours_listed or _matches(f, patterns)}
    mine |= {f for f in files if _temporary_of(f, mine | ours_listed)}
    return [f for f in files if f in mine], [f for f in files if f not in mine and f != LOCK]


def remove_run(folder: Path) -> bool:
    """Delete the files dnrt wrote in `folder`; refuse, naming them, when it holds others (nothing is deleted
    then). True when there was something to delete."""
    mine, others = split_files(folder)
    if others:
        more = f" and {len(others) - SHOWN} more" if len(others) > SHOWN else ""
        raise DNRTError(f"--overwrite True removes only what dnrt wrote, and {folder} also holds "
                        f"{', '.join(others[:SHOWN])}{more}; move those away, or choose another output_dir")
    for name in mine:
        (folder / name).unlink()
    board = folder / TENSORBOARD
    if board.is_dir() and not any(board.iterdir()):
        shutil.rmtree(board)
    return bool(mine)
