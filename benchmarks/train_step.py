"""One training step with GELU, RAA, RAA + ARR and the authors' way, side by side in one run.

    python benchmarks/train_step.py [--model vit_tiny_patch4_32|resnet18_cifar] [--device cuda] [--batch-size 256]
        [--amp bf16|fp16|off] [--compile] [--compile-mode default|reduce-overhead|...] [--no-eager]
        [--kinds gelu raa raa_arr authors] [--dry-run]

A step is forward, cross-entropy (+ the ARR loss), backward, gradient clipping at 1.0 and AdamW, on a fixed
random CIFAR-100-shaped batch. The kinds: ``gelu`` (the model with GELU; for ResNet-18 its ReLUs become GELU),
``raa`` (``dnrt.convert``), ``raa_arr`` (``dnrt.convert`` + ``dnrt.ARR``, weight 20) and ``authors`` (the authors'
way, ``benchmarks/authors.py``: their plain-autograd RAA module and, per tapped block, their per-sample NumPy
memory). ``--compile`` compiles forward + loss with ``torch.compile`` (mode ``--compile-mode``; on CUDA
``reduce-overhead`` runs it as CUDA graphs); backward, clipping and AdamW stay eager in every row. Each mode's
kinds are timed in interleaved rounds and compared with that mode's GELU (median and range of the per-round
ratios). On CUDA each row also gives the step's peak memory above what was allocated before it, and per step,
from ``torch.profiler``: kernel launches, CUDA-graph launches, host synchronisations and device-to-host copies.
"""
from __future__ import annotations

import argparse
import types
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

import dnrt
from authors import AuthorsARR, to_authors_raa
from dnrt.tool.models import create_model
from timing import header, rounds, summary

KINDS = {"gelu": "GELU", "raa": "RAA", "raa_arr": "RAA + ARR", "authors": "authors' RAA + ARR"}
MODELS = ("vit_tiny_patch4_32", "resnet18_cifar")
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaLaunchCooperativeKernel"}
SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
COUNTS = ("launches", "graphs", "syncs", "d2h")


def build(kind: str, name: str, device: torch.device, model_kwargs: dict):
    """The model of ``kind`` and its ARR (ours, the authors' or None)."""
    if kind == "gelu":
        act = "gelu" if name.startswith("resnet") else None  # ViT-Tiny's own activation is GELU
    else:
        act = "raa"
    model = create_model(name, 100, img_size=32, act=act, model_kwargs=model_kwargs).to(device)
    if kind == "raa_arr":
        return model, dnrt.ARR(model, 100, weight=20.0).to(device)
    if kind == "authors":
        return to_authors_raa(model), AuthorsARR(model, 100, weight=20.0)
    return model, None


def own_code(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own: dynamo caches compiled graphs per code object and does not guard on
    forward hooks, so each kind's function must not find another kind's graphs (nor share its recompile limit)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def make_step(kind: str, args: argparse.Namespace, device: torch.device, mode: Optional[str]) -> Callable[[], None]:
    """One training step of a fresh model of ``kind`` on a fixed random batch (``mode``: None for eager)."""
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    model, arr = build(kind, args.model, device, args.model_kwargs)
    model.train()

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss if arr is None else loss + arr.loss(y)

    if mode is not None:
        options = {"backend": "eager"} if args.dry_run else {"mode": None if mode == "default" else mode}
        forward_loss = torch.compile(own_code(forward_loss, kind), **options)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    graphs = mode == "reduce-overhead" and not args.dry_run

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward_loss(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    return step


def peak_mib(step: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory of one step above what was allocated before it (CUDA; None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def launches_and_syncs(step: Callable[[], None], device: torch.device, steps: int = 3) -> Optional[Dict[str, float]]:
    """Per step, from ``torch.profiler``: kernel launches, CUDA-graph launches, host synchronisations and
    device-to-host copies (CUDA; None elsewhere). The synchronisation that closes the profile is not counted."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    counts = dict.fromkeys(COUNTS, 0)
    counts["syncs"] = -1
    for event in prof.key_averages():
        if event.key in LAUNCHES:
            counts["launches"] += event.count
        elif event.key == "cudaGraphLaunch":
            counts["graphs"] += event.count
        elif event.key in SYNCS:
            counts["syncs"] += event.count
        elif event.key.startswith("Memcpy DtoH"):
            counts["d2h"] += event.count
    return {key: n / steps for key, n in counts.items()}


def measure(args: argparse.Namespace, device: torch.device, mode: Optional[str]) -> List[str]:
    """The rows of one mode: every kind timed in interleaved rounds, ratios to that mode's GELU."""
    label = "eager" if mode is None else f"compiled ({mode})"
    if mode is not None:
        torch._dynamo.reset()
    steps = {KINDS[kind]: make_step(kind, args, device, mode) for kind in args.kinds}
    times = summary(rounds(steps, args.rounds, args.min_time), next(iter(steps)))
    lines = []
    for name, step in steps.items():
        ms, ratio, (low, high) = times[name]
        peak = peak_mib(step, device)
        counts = launches_and_syncs(step, device)
        profile = " | ".join("n/a" if counts is None else f"{counts[key]:.0f}" for key in COUNTS)
        lines.append(f"| {label} | {name} | {ms:.2f} | {ratio:.3f} ({low:.3f}–{high:.3f}) | "
                     f"{'n/a' if peak is None else f'{peak:.0f}'} | {profile} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch4_32", choices=MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                        help="autocast dtype (fp16 with a GradScaler); default bf16 on CUDA, off elsewhere")
    parser.add_argument("--compile", action="store_true", help="also time the step with forward + loss compiled")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (implies --compile; reduce-overhead: CUDA graphs); default 'default'")
    parser.add_argument("--no-eager", action="store_true", help="time only the compiled step")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per candidate and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, CUDA graphs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="batch 2, a 2-block ViT, one round, compile with backend 'eager': checks that it runs")
    args = parser.parse_args()
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "off")
    args.model_kwargs = {}
    if args.dry_run:
        args.batch_size, args.rounds, args.min_time, args.warmup = 2, 1, 0.0, 1
        args.model_kwargs = {"depth": 2} if args.model.startswith("vit") else {}
    device = torch.device(args.device)
    modes: List[Optional[str]] = [] if args.no_eager else [None]
    if args.compile or args.compile_mode:
        modes.append(args.compile_mode or "default")
    print(header(device) + (" (dry run: tiny sizes, timings meaningless)" if args.dry_run else ""))
    print(f"{args.model}, 32×32, 100 classes, batch {args.batch_size}, AMP {args.amp}, AdamW, clip 1.0; "
          f"{args.rounds} interleaved rounds of ≥ {args.min_time} s per kind")
    print("| mode | kind | ms/step | × GELU (range) | peak MiB above resident | kernel launches/step | "
          "CUDA-graph launches/step | host syncs/step | D2H copies/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for line in measure(args, device, mode):
            print(line, flush=True)


if __name__ == "__main__":
    main()
