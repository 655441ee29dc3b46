"""`dnrt compare`: one Markdown table of several runs' settings, accuracy and wall time.

Reads run folders through dnrt.tool.rundir, like `dnrt plot curves`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from dnrt.errors import DNRTError
from dnrt.tool import rundir
from dnrt.tool.rundir import read_config

COLUMNS = ("run", "model", "act", "ARR weight", "epochs", "best top-1", "last top-1", "wall time (s)",
           "Δ best top-1")


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's log.txt rows (rundir.read_log); a folder without epochs is a DNRTError."""
    return rundir.read_log(run_dir, required=True)


def arr_weight(cfg: dict[str, Any]) -> Optional[float]:
    """The run's ARR weight λ, or None when the run trained without ARR."""
    if cfg.get("criterion") != "arr":
        return None
    return float(cfg.get("arr_loss_coef", 0.0))


def run_label(run_dir: str | Path, cfg: dict[str, Any]) -> str:
    """A short legend label: directory name, model, activation and ARR weight."""
    parts = [str(cfg.get("model", "?")), str(cfg.get("act") or "own act")]
    weight = arr_weight(cfg)
    if weight is not None:
        parts.append(f"ARR λ={weight:g}")
    return f"{Path(run_dir).name}: " + ", ".join(parts)


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One run's row: settings from config.json, accuracies and wall time from log.txt."""
    cfg, log = read_config(run_dir), read_log(run_dir)
    acc = [float(row["test_acc1"]) for row in log if row.get("test_acc1") is not None]
    if not acc:
        raise DNRTError(f"{Path(run_dir) / 'log.txt'}: no epoch evaluated yet (no test_acc1)")
    return {
        "run": str(run_dir),
        "model": cfg.get("model", "?"),
        "act": cfg.get("act") or "own",
        "arr_weight": arr_weight(cfg),
        "epochs": len(log),
        "best_acc1": max(acc),
        "last_acc1": acc[-1],  # the last evaluated epoch (eval_interval may skip some)
        "wall_time_s": math.fsum(float(row.get("epoch_time", 0.0)) for row in log),
    }


def _cells(row: dict[str, Any], base_best: float) -> list[str]:
    """Format one summary as Markdown cells (accuracy to 2 decimals, wall time to 1)."""
    weight = "-" if row["arr_weight"] is None else f"{row['arr_weight']:g}"
    return [row["run"], str(row["model"]), str(row["act"]), weight, str(row["epochs"]),
            f"{row['best_acc1']:.2f}", f"{row['last_acc1']:.2f}", f"{row['wall_time_s']:.1f}",
            f"{row['best_acc1'] - base_best:+.2f}"]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render summaries as a Markdown table; Δ is each run's best top-1 minus the first run's."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row, rows[0]["best_acc1"])) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """The comparison table of the given runs, the first being the reference for Δ."""
    if not run_dirs:
        raise DNRTError("compare needs at least one run directory")
    return markdown_table([summarize_run(d) for d in run_dirs])


def write_comparison(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None) -> Path:
    """Write compare.md (and compare.json with the unrounded numbers) to --out or the first run directory."""
    rows = [summarize_run(d) for d in run_dirs] if run_dirs else []
    if not rows:
        raise DNRTError("compare needs at least one run directory")
    path = rundir.output_path(out, run_dirs[0], "compare.md")
    with rundir.output_error(path):
        rundir.write_text(path, markdown_table(rows))
        rundir.write_json(path.with_suffix(".json"), rows)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dnrt compare`."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories; the first is the reference")
    parser.add_argument("--out", default=None, help="file or folder for compare.md (an existing folder, or one "
                                                    "ending in /; default: the first run dir)")


def run(args: argparse.Namespace) -> int:
    """Print the comparison table and write it beside the first run."""
    path = write_comparison(args.run_dirs, args.out)
    print(path.read_text(), end="")
    print(f"written: {path}")
    return 0
