"""Time of one training step of ViT-Tiny (patch 4, 32×32, CIFAR-100 shapes) with GELU, RAA and RAA+ARR.

    python benchmarks/train_step.py [--device cuda] [--batch-size 256] [--fused] [--compile]

Side by side in one run, as ratios to GELU: what DNRT costs in a real step (forward, ARR, backward,
AdamW), with AMP on CUDA. ``--fused`` runs eager RAA with ``dnrt.set_fused(True)`` (its C++ kernels on
the CPU; on CUDA Triton runs either way). Eager models are timed in interleaved rounds (ratios per round); compiled ones
one after another, each after a dynamo reset, since dynamo does not guard on ARR's hooks.
"""
from __future__ import annotations

import argparse
from typing import Callable

import timm
import torch
from torch import nn

import dnrt
from timing import side_by_side

KINDS = ["GELU", "RAA", "RAA + ARR"]


def build(kind: str, device: torch.device, example: torch.Tensor):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=100,
                              drop_path_rate=0.1).to(device)
    arr = None
    if kind != "GELU":
        dnrt.convert(model, example)
    if kind == "RAA + ARR":
        arr = dnrt.ARR(model, 100, weight=20.0).to(device)
    return model, arr


def make_step(kind: str, device: torch.device, batch: int, compile_model: bool) -> Callable[[], None]:
    """One AdamW training step of a fresh model of ``kind`` on a fixed random batch."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    model, arr = build(kind, device, x[:1])
    run = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                         enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            loss = nn.functional.cross_entropy(run(x), y)
            if arr is not None:
                loss = loss + arr.loss(y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step()
    return step


def compiled_times(device: torch.device, batch: int) -> dict:
    """``{kind: (ms, ratio to GELU)}``, each model compiled and timed after a dynamo reset."""
    times = {}
    for kind in KINDS:
        torch._dynamo.reset()
        times[kind] = side_by_side({kind: make_step(kind, device, batch, True)}, device, rounds=3)[kind][0]
    return {kind: (ms, ms / times["GELU"]) for kind, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--fused", action="store_true", help="eager RAA with dnrt.set_fused(True)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = parser.parse_args()
    dnrt.set_fused(True if args.fused else "auto")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fused = ", set_fused(True)" if args.fused else ""
    print(f"ViT-Tiny patch 4, 32×32, batch {args.batch_size}, AdamW, clip 1.0, {name}{fused}")
    rows = {"eager": side_by_side({kind: make_step(kind, device, args.batch_size, False) for kind in KINDS}, device,
                                  rounds=5, min_run_time=1.0)}
    if args.compile:
        rows["torch.compile"] = compiled_times(device, args.batch_size)
    for label, times in rows.items():
        for kind, (ms, ratio) in times.items():
            print(f"   {label:13s} {kind:10s} {ms:8.2f} ms/step   {ratio:5.3f}×")


if __name__ == "__main__":
    main()
