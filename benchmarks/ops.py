"""Speed and memory of the core ops, each as a ratio measured side by side in one run.

    python benchmarks/ops.py [--device cpu|cuda] [--skip-fused] [--malloc-top-pad MIB]

Each comparison times its candidates in interleaved rounds and reports, per candidate, the median time
and the median of its per-round ratio to the baseline, so that drift in a shared machine's speed cancels.

1. RAA forward+backward vs nn.GELU on a [64, 65, 768] float32 tensor (the Function eagerly, with its fused
   kernels (``set_fused(True)``: C++ on the CPU), under ``torch.compile``, and a plain-autograd RAA for
   reference); goal ≤ 1.5×.
2. Bytes autograd keeps for backward in one ViT-Tiny (patch 4, 32×32, batch 64) training step, RAA vs
   nn.GELU; goal ≤ 1.05×.
3. ResponseMemory update for batch 256, 100 classes, 12 layers of width 192 (side by side in one memory,
   as ARR keeps them), vs a per-sample Python loop (the authors' way); goal ≥ 50× faster.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import platform
from typing import Callable

import timm
import torch
from torch import nn

import dnrt
from dnrt.nn import kernels
from timing import side_by_side


def fused_mode(mode, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with ``dnrt.nn.kernels.set_fused(mode)``."""
    def run() -> None:
        kernels.set_fused(mode)
        try:
            fn()
        finally:
            kernels.set_fused("auto")
    return run


def plain_raa(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RAA by plain autograd: every intermediate is kept."""
    s = (x @ w + b).unsqueeze(-1)
    return x * 0.5 * (1 + torch.erf((x + s) / math.sqrt(2)))


def activation_speed(device: torch.device, with_fused: bool) -> None:
    """Forward+backward to the input's (and RAA's parameters') gradients, returned, not accumulated."""
    torch.manual_seed(0)
    x = torch.randn(64, 65, 768, device=device, requires_grad=True)
    g = torch.randn_like(x)
    raa, gelu = dnrt.RAA(768).to(device), nn.GELU()
    with torch.no_grad():
        raa.weight.normal_(0, 0.02)
    inputs = [x, raa.weight, raa.bias]
    runs = {
        "nn.GELU": lambda: torch.autograd.grad(gelu(x), x, g),
        "RAA plain autograd": lambda: torch.autograd.grad(plain_raa(x, raa.weight, raa.bias), inputs, g),
        "dnrt.RAA eager": fused_mode(False, lambda: torch.autograd.grad(raa(x), inputs, g)),
    }
    if device.type == "cuda":
        runs["dnrt.RAA (Triton)"] = lambda: torch.autograd.grad(raa(x), inputs, g)
    elif with_fused:
        compiled = torch.compile(raa)
        runs["dnrt.RAA fused (C++)"] = fused_mode(True, lambda: torch.autograd.grad(raa(x), inputs, g))
        runs["torch.compile(RAA)"] = lambda: torch.autograd.grad(compiled(x), inputs, g)
    print(f"\n1. forward+backward on [64, 65, 768] float32, {device.type} (goal: dnrt.RAA ≤ 1.5× nn.GELU)")
    for name, (ms, ratio) in side_by_side(runs, device).items():
        print(f"   {name:22s} {ms:8.3f} ms   {ratio:5.2f}×")


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, arr=None) -> int:
    """Bytes of distinct non-parameter storages autograd keeps during one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
        if arr is not None:
            loss = loss + arr.loss(y)
    loss.backward()
    return sum(kept.values())


def vit_tiny() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=100, drop_path_rate=0.0)


def activation_memory(device: torch.device) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 100, (64,), device=device)
    gelu = vit_tiny().to(device)
    raa = dnrt.convert(vit_tiny().to(device), x[:1])
    plain = dnrt.convert(vit_tiny().to(device), x[:1])
    for block in plain.blocks:
        act = block.mlp.act
        block.mlp.act = PlainRAA(act)
    raa_arr = dnrt.convert(vit_tiny().to(device), x[:1])
    arr = dnrt.ARR(raa_arr, 100)
    base = saved_bytes(gelu, x, y)
    print("\n2. bytes kept for backward, ViT-Tiny patch 4, 32×32, batch 64 (goal: RAA ≤ 1.05× GELU)")
    for name, model, extra in [("GELU", gelu, None), ("RAA plain autograd", plain, None), ("dnrt RAA", raa, None),
                               ("dnrt RAA + ARR", raa_arr, arr)]:
        n = saved_bytes(model, x, y, extra)
        print(f"   {name:22s} {n / 2**20:8.1f} MiB   {n / base:5.3f}×")


class PlainRAA(nn.Module):
    """The plain-autograd RAA of part 1 around an RAA's parameters, for the memory comparison."""

    def __init__(self, raa: dnrt.RAA) -> None:
        super().__init__()
        self.raa = raa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_raa(x, self.raa.weight, self.raa.bias)


def loop_update(means: list, seen: list, responses: list, targets: torch.Tensor, momentum: float) -> None:
    """The authors' way: memory on the CPU, one sample at a time, per layer."""
    labels = targets.cpu().tolist()
    for layer, r in enumerate(responses):
        r = r.detach().cpu()
        for i, k in enumerate(labels):
            if not seen[layer][k]:
                means[layer][k] = r[i]
                seen[layer][k] = True
            else:
                means[layer][k] = (1 - momentum) * means[layer][k] + momentum * r[i]


def memory_speed(device: torch.device) -> None:
    torch.manual_seed(0)
    layers, batch, classes, width = 12, 256, 100, 192
    responses = [torch.randn(batch, width, device=device) for _ in range(layers)]
    targets = torch.randint(0, classes, (batch,), device=device)
    memory = dnrt.ResponseMemory(classes, layers * width).to(device)
    means = [torch.zeros(classes, width) for _ in range(layers)]
    seen = [[False] * classes for _ in range(layers)]

    results = side_by_side({
        "per-sample Python loop": lambda: loop_update(means, seen, responses, targets, 0.1),
        "dnrt.ResponseMemory": lambda: memory(torch.cat(responses, dim=1), targets),
    }, device)
    print(f"\n3. memory update, batch {batch}, {classes} classes, {layers} layers × {width}, {device.type} "
          f"(goal ≥ 50×)")
    (loop_ms, _), (fast_ms, ratio) = results.values()
    print(f"   per-sample Python loop {loop_ms:8.3f} ms")
    print(f"   dnrt.ResponseMemory    {fast_ms:8.3f} ms   {1 / ratio:5.1f}× faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-fused", action="store_true",
                        help="skip the fused and compiled kernels (they build on first use)")
    parser.add_argument("--malloc-top-pad", type=int, metavar="MIB",
                        help="glibc only: keep this much freed heap instead of returning it to the OS (M_TOP_PAD)")
    args = parser.parse_args()
    if args.malloc_top_pad is not None:
        ctypes.CDLL("libc.so.6").mallopt(-2, args.malloc_top_pad << 20)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    pad = "" if args.malloc_top_pad is None else f"; malloc top pad {args.malloc_top_pad} MiB"
    print(f"device: {name}; torch {torch.__version__}, timm {timm.__version__}{pad}")
    activation_speed(device, not args.skip_fused)
    activation_memory(device)
    memory_speed(device)


if __name__ == "__main__":
    main()
