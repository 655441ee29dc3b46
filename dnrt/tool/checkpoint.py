"""Checkpoints: atomic save, weights_only load, and rebuilding a trained run (model + ARR) from one file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnrt.errors import DNRTError


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to a temporary file in the same folder, then rename: a killed run never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True); a missing or unreadable file is a DNRTError."""
    path = Path(path)
    if not path.is_file():
        raise DNRTError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling a damaged file can raise almost any exception type
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise DNRTError(f"checkpoint {path} is corrupt or not a dnrt checkpoint "
                        f"({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DNRTError(f"checkpoint {path} is not a dnrt checkpoint (no 'model' entry)")
    return state


def load_run(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict]:
    """Rebuild the model (and ARR, when the run used it) from a checkpoint's saved config and load its weights."""
    from dnrt.tool.config import resolve
    from dnrt.tool.models import build_arr, create_model

    state = load_checkpoint(checkpoint_path)
    if "config" not in state or "model_args" not in state:
        raise DNRTError(f"checkpoint {checkpoint_path} has no saved config; it was not written by `dnrt train`")
    cfg = resolve(state["config"])
    model = create_model(cfg["model"], act=cfg["act"], model_lib=cfg["model_lib"],
                         model_kwargs=cfg["model_kwargs"], **state["model_args"])
    model.load_state_dict(state["model"])
    arr = build_arr(model, cfg, state["model_args"]["num_classes"])
    if arr is not None:
        arr.load_state_dict(state["arr"])
    model.to(device).eval()
    if arr is not None:
        arr.to(device).eval()
    return model, arr, cfg
