"""`dnrt export`: a trained model as ONNX, a `torch.export` program (.pt2) or TorchScript, for inference without dnrt.

The model is rebuilt from its checkpoint without ARR (inference needs none); RAA records its plain formula in the
graph. The file is checked against the eager model on a random batch before the command reports success.
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dnrt.errors import DNRTError
from dnrt.tool import rundir

SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def export_model(model: nn.Module, example: torch.Tensor, fmt: str, out: str | os.PathLike) -> Callable:
    """Write `model` (in eval mode, batch size free) in format `fmt` to `out` atomically; return a function that
    runs the written file on a batch, for checking."""
    if fmt not in SUFFIXES:
        raise DNRTError(f"unknown export format '{fmt}'; use {', '.join(SUFFIXES)}")
    out = Path(out)
    model.eval()
    with rundir.output_error(out), rundir.temp_beside(out, suffix=SUFFIXES[fmt]) as tmp, torch.no_grad(), \
            warnings.catch_warnings():
        # the tracer warns at every width check; widths are fixed by the architecture, so the checks are constant
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _WRITERS[fmt](model, example, tmp)
    return _READERS[fmt](out)


def _dynamic_shapes() -> tuple:
    """The batch size is free; everything else is fixed by the checkpoint."""
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def _write_pt2(model: nn.Module, example: torch.Tensor, path: str) -> None:
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes()), path)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise DNRTError("ONNX export needs the onnx and onnxscript packages: pip install 'dnrt[onnx]'") from None
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=_dynamic_shapes(),
                      input_names=["input"], output_names=["logits"], verbose=False,
                      external_data=False)  # one file (up to 2 GB), so that renaming it into place keeps it whole


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    torch.jit.save(torch.jit.trace(model, example), path)


def _read_onnx(path: Path) -> Callable:
    try:
        import onnxruntime
    except ImportError:
        return lambda x: None  # onnxruntime is optional: the file is written, not checked
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


_WRITERS = {"onnx": _write_onnx, "pt2": _write_pt2, "torchscript": _write_torchscript}
_READERS = {"onnx": _read_onnx, "pt2": lambda p: torch.export.load(str(p)).module(), "torchscript": torch.jit.load}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dnrt export`."""
    parser.add_argument("-r", "--resume", required=True, metavar="CHECKPOINT", help="a checkpoint of `dnrt train`")
    parser.add_argument("--format", required=True, choices=list(SUFFIXES),
                        help="onnx (needs onnx, onnxscript), pt2 (torch.export), torchscript (torch.jit.trace)")
    parser.add_argument("--out", metavar="PATH", help="the file to write, or a folder to write it in (default: beside "
                                                      "the checkpoint, its name with the format's suffix: .onnx, .pt2, "
                                                      ".pt)")


def run(args: argparse.Namespace) -> int:
    """Rebuild the checkpoint's model, export it, check the file against the eager model and say where it is."""
    from dnrt.tool.rundir import load_checkpoint, load_run

    model, arr, cfg = load_run(args.resume)
    if arr is not None:
        arr.remove()  # its hooks only record responses for the loss
    sizes = load_checkpoint(args.resume)["model_args"]
    default = Path(args.resume).with_suffix(SUFFIXES[args.format])
    out = rundir.output_path(args.out, default.parent, default.name)
    if out.resolve() == Path(args.resume).resolve():
        raise DNRTError(f"the export would overwrite its checkpoint {args.resume}; choose another --out")
    torch.manual_seed(0)
    example = torch.randn(2, sizes["in_chans"], sizes["img_size"], sizes["img_size"])
    exported = export_model(model, example, args.format, out)
    check = torch.randn(3, *example.shape[1:])  # another batch size than the one exported with
    with torch.no_grad():
        got, want = exported(check), model(check)
    checked = "not checked (onnxruntime is not installed)" if got is None else \
        f"max |export - eager| {float((got - want).abs().max()):.1e} on a random batch of 3"
    print(f"exported {args.resume} ({cfg['model']}, act {cfg['act'] or 'its own'}) as {args.format} to {out}: "
          f"input [N, {', '.join(map(str, example.shape[1:]))}] float32 as the tool's evaluation transform "
          f"gives it; {checked}")
    return 0
