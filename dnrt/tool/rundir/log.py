"""log.txt: one strict-JSON line per epoch; read, checked before a run continues it, kept, appended."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dnrt.errors import DNRTError
from dnrt.tool.rundir.files import LOG, dumps, write_text


def _rows(log: Path) -> dict[int, dict[str, Any]]:
    """{epoch: row} of a log file (a repeated epoch keeps its last line); a line that is not a JSON object with an
    integer 'epoch' is a DNRTError naming the file and line."""
    try:
        text = log.read_text()
    except UnicodeDecodeError:
        raise DNRTError(f"{log} is not text: not a log of `dnrt train`") from None
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DNRTError(f"{log}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise DNRTError(f"{log}:{number}: a log line needs an integer 'epoch' key")
        rows[row["epoch"]] = row
    return rows


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
    rows = _rows(log)
    if required and not rows:
        raise DNRTError(f"{log} holds no epochs yet")
    return [rows[e] for e in sorted(rows)]


def first_epoch(run_dir: Path, resumes: list[dict[str, Any]]) -> int:
    """The first epoch `run_dir`'s log holds: where the last resume from a checkpoint outside the folder (`-r` of
    another run's checkpoint, a copied folder) began, else 0."""
    here = Path(run_dir).resolve()
    first = 0
    for resume in resumes:
        if Path(resume["checkpoint"]).resolve().parent != here:
            first = resume["epoch"]
    return first


def check_log(run_dir: Path, done: int, source: str, first: int = 0) -> str | None:
    """Before a run continues at epoch `done` (as `source` says): refuse a log.txt that cannot be trusted (a line
    that does not parse, or epochs from `first` on missing that the checkpoint says ran) with the way out; a
    missing log is that way out, and returns the note that the log restarts at `done`."""
    log = run_dir / LOG
    if not log.is_file():
        return f"{log} is missing: the log goes on from epoch {done}, without the lines of the epochs before" \
            if done else None
    way_out = f"move it aside (mv {log} {log}.damaged) and give the same command again: the run continues from " \
              f"{source}, its log restarting at epoch {done}"
    try:
        rows = _rows(log)
    except DNRTError as e:
        raise DNRTError(f"{e}: the log cannot be trusted; {way_out}") from None
    missing = [e for e in range(first, done) if e not in rows]
    if missing:
        held = "holds no epochs" if not rows else f"lacks epoch{'s' * (len(missing) > 1)} {_span(missing)}"
        raise DNRTError(f"{log} {held} while {source} says {done} epoch{'s' * (done != 1)} ran: the log cannot be "
                        f"trusted; {way_out}")
    return None


def _span(epochs: list[int]) -> str:
    return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}..{epochs[-1]}" if \
        epochs == list(range(epochs[0], epochs[-1] + 1)) else ", ".join(map(str, epochs[:5]))


def log_lines(run_dir: Path, before_epoch: int) -> list[str]:
    """The log's lines of the epochs before `before_epoch`, byte for byte (check_log has vouched for them)."""
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
