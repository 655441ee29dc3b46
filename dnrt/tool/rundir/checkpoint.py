"""Checkpoints: what a resume needs (built here, beside save and load), atomic save, weights_only load, the checks
that a checkpoint fits the model and holds finite weights, and rebuilding a trained run (model + ARR) from one file."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dnrt.errors import DNRTError
from dnrt.tool.rundir.files import BEST, LATEST, atomic_write

SHOWN_KEYS = 3  # how many names of each kind of mismatch a message lists


def checkpoint_state(weights: dict[str, Any], arr: Any, optimizer_state: dict[str, Any],
                     scaler: torch.amp.GradScaler, epoch: int, best_acc1: float, cfg: dict, model_args: dict,
                     resumes: list, lr_scale: float = 1.0) -> dict[str, Any]:
    """Everything a resume needs, as plain types and tensors (loadable with weights_only=True); `weights` and
    `optimizer_state` are the full states (distributed.full_state gathers a sharded model's). The lr schedule is
    not saved: it is rebuilt from the config and the epoch, so a resume with more epochs follows the new length;
    `lr_scale` is the product of the drops `drop_lr_now` made, applied to it again on every resume."""
    from dnrt.tool.config import jsonable

    return {"model": weights, "arr": arr.state_dict() if arr is not None else None,
            "optimizer": optimizer_state, "scaler": scaler.state_dict(), "epoch": epoch,
            "best_acc1": best_acc1, "config": jsonable(cfg), "model_args": dict(model_args),
            "resumes": list(resumes), "lr_scale": lr_scale}


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Serialise in memory, then write atomically: a killed run never leaves a torn file, and a full disk raises
    OSError (naming errno) instead of torch's writer error."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True); a missing or unreadable file is a DNRTError."""
    path = Path(path)
    if not path.is_file():
        raise DNRTError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling a damaged file can raise almost any exception type
        raise DNRTError(f"checkpoint {path} {unreadable(e)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DNRTError(f"checkpoint {path} is not a dnrt checkpoint (no 'model' entry)")
    return state


def checkpoint_in(path: str | os.PathLike, best: bool = False) -> tuple[str, str | None]:
    """The checkpoint a `-r` value means: the file itself, or in a run folder its checkpoint.pth (its
    checkpoint_best.pth when `best`, for evaluation); with the one line that says which a folder gave."""
    path = Path(path)
    if not path.is_dir():
        return str(path), None
    name = BEST if best else LATEST
    if not (path / name).is_file():
        raise DNRTError(f"-r {path} is a folder without {name}: give -r a checkpoint file, or the folder of a run of "
                        f"`dnrt train`")
    kind = "best" if best else "latest"
    return str(path / name), f"-r {path} is a run folder: using its {kind} checkpoint, {path / name}"


def unreadable(error: Exception, what: str = "a dnrt checkpoint") -> str:
    """Why torch.load(weights_only=True) refused a file, in our words (torch's text names its internals)."""
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
        return "is not a weights-only file: it holds pickled Python objects, which dnrt does not load (they can run " \
               "code); save its state_dict with torch.save, or give a checkpoint of `dnrt train`"
    if isinstance(error, OSError):
        return f"cannot be read: {error.strerror or error}"
    return f"is corrupt or not {what} (torch.load cannot read it)"


def non_finite_tensors(state: dict[str, Any] | None) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or ±inf."""
    if not state:
        return []
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN_KEYS} more)" if len(names) > SHOWN_KEYS else ""
    return ", ".join(names[:SHOWN_KEYS]) + more


def state_mismatch(own: dict[str, torch.Tensor], saved: dict[str, Any]) -> str | None:
    """How a saved state dict differs from a module's: counts of missing, unexpected and reshaped keys, a few
    names each; None when it fits."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [f"{k} {list(saved[k].shape)} vs {list(own[k].shape)}" for k in own
                if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape
                and not (saved[k].dim() == 0 and own[k].shape == (1,))]  # RAA's bias before dnrt kept it 1-d
    parts = [f"{len(names)} {kind} ({_listed(names)})"
             for kind, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
             if names]
    return "; ".join(parts) or None


def load_weights(state: dict, model: nn.Module, arr: Any, path: str | os.PathLike) -> None:
    """Model weights and, with ARR on, its memories from a checkpoint; refuse one of another model, or one with
    non-finite weights, naming what is wrong."""
    bad = non_finite_tensors(state["model"]) + non_finite_tensors(state.get("arr"))
    if bad:
        raise DNRTError(f"checkpoint {path} holds non-finite weights in {len(bad)} tensors ({_listed(bad)})")
    mismatch = state_mismatch(model.state_dict(), state["model"])
    if mismatch:
        raise DNRTError(f"checkpoint {path} is of another model than {type(model).__name__}: keys {mismatch}")
    try:
        model.load_state_dict(state["model"])
        if arr is not None:
            if state.get("arr") is None:
                raise DNRTError(f"checkpoint {path} holds no ARR memory; set criterion='ce' to use it")
            arr.load_state_dict(state["arr"])
    except RuntimeError as e:
        raise DNRTError(f"checkpoint {path} does not fit this model/config: {str(e).splitlines()[0]}") from None


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
    arr = build_arr(model, cfg, state["model_args"]["num_classes"])
    load_weights(state, model, arr, checkpoint_path)
    model.to(device).eval()
    if arr is not None:
        arr.to(device).eval()
    return model, arr, cfg
