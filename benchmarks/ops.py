"""The core ops against GELU and against the authors' implementation, every figure side by side in one run.

    python benchmarks/ops.py [--device cpu|cuda] [--skip-fused] [--compile-backend aot_eager] [--dry-run]

Each comparison times its candidates in interleaved rounds (``benchmarks/timing.py``) and reports, per
candidate, the median time and the median (min–max) of its per-round ratio to the baseline, so that drift in a
shared machine's speed cancels. The baselines are what the authors run (``benchmarks/authors.py``): their RAA
module in plain autograd, and their memory (responses to NumPy once per layer, then a per-sample loop of NumPy
row operations).

1. RAA forward+backward vs ``nn.GELU`` on [64, 65, 768] float32 (on CUDA also [256, 65, 768] bfloat16 under
   autocast): ``dnrt.RAA`` with default settings, with ``set_fused(False)`` (plain PyTorch), with
   ``set_fused(True)`` (the CPU's C++ kernels), and the authors' RAA. Goal: default ≤ 1.5×.
2. ``dnrt.RAA(128, channel_dim=1)`` on an NCHW [64, 128, 16, 16] map, the same candidates. Goal ≤ 1.5×.
3. Bytes autograd keeps for backward in one ViT-Tiny (patch 4, 32×32, batch 64) step. Goal: RAA ≤ 1.05× GELU.
4. ``ResponseMemory`` update, batch 256, 100 classes, 12 memories of width 192 vs the authors' 12. Goal ≥ 20×.
5. The same responses as one memory of width 2304 (as ARR keeps them) vs the authors' loop on one memory of width
   2304. Goal ≥ 5×.
6. ``torch.compile(fullgraph=True)`` of forward + cross-entropy + ``arr.loss`` on a converted ViT-Tiny (ok, or
   the first line of the error), then the step compiled without ``fullgraph`` over 12 steps (backward and AdamW
   eager): graph breaks and compilations after step 1. Goal: compiles once, 0 breaks, 0 recompilations.
"""
from __future__ import annotations

import argparse
import ctypes
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import timm
import torch
from torch import nn
from torch.nn import functional as F

import dnrt
from authors import AuthorsMemory, AuthorsRAA, to_authors_raa
from timing import header, side_by_side


@dataclass
class Sizes:
    """Every shape the script uses; ``--dry-run`` shrinks them all to check that each part starts."""
    act: tuple = (64, 65, 768)
    act_bf16: tuple = (256, 65, 768)
    nchw: tuple = (64, 128, 16, 16)
    vit_batch: int = 64
    vit_depth: int = 12
    memory_batch: int = 256
    classes: int = 100
    layers: int = 12
    width: int = 192
    compile_steps: int = 12
    rounds: int = 9
    min_time: float = 0.2


DRY = Sizes(act=(2, 5, 16), act_bf16=(2, 5, 16), nchw=(2, 8, 4, 4), vit_batch=2, vit_depth=2, memory_batch=8,
            classes=4, layers=2, width=4, compile_steps=2, rounds=1, min_time=0.0)


def fused(mode, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run under ``dnrt.set_fused(mode)``, the default ("auto") restored after."""
    def run() -> None:
        dnrt.set_fused(mode)
        try:
            fn()
        finally:
            dnrt.set_fused("auto")
    return run


def ratio(result: tuple) -> str:
    """A ``side_by_side`` result as 'median× (min–max)'."""
    _, median, (low, high) = result
    return f"{median:.2f}× ({low:.2f}–{high:.2f})"


def faster(result: tuple) -> str:
    """A ``side_by_side`` result against a slower baseline, as 'N× faster (min–max)'."""
    _, median, (low, high) = result
    return f"{1 / median:.1f}× faster ({1 / high:.1f}–{1 / low:.1f})"


def print_rows(results: Dict[str, tuple], as_speedup: bool = False) -> None:
    """One line per candidate: median ms and ratio to the first (or, ``as_speedup``, how many times faster)."""
    for name, result in results.items():
        print(f"   {name:34s} {result[0]:9.3f} ms   {(faster if as_speedup else ratio)(result)}")


def activation_runs(raa: dnrt.RAA, x: torch.Tensor, fused_rows: bool, autocast: Optional[torch.dtype]):
    """Forward+backward to the input's (and parameters') gradients, returned rather than accumulated, so that
    only the activation's own work is compared; candidates for ``side_by_side``, ``nn.GELU`` first."""
    gelu, authors = nn.GELU(), AuthorsRAA.like(raa)
    g = torch.randn_like(x)
    ours, theirs = [x, raa.weight, raa.bias], [x, authors.weight, authors.bias]

    def grad(module: nn.Module, inputs: List[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                y = module(x)
            torch.autograd.grad(y, inputs, g.to(y.dtype))
        return run

    runs = {"nn.GELU": grad(gelu, [x]), "dnrt.RAA (default)": grad(raa, ours),
            "dnrt.RAA set_fused(False)": fused(False, grad(raa, ours))}
    if fused_rows:
        runs["dnrt.RAA set_fused(True)"] = fused(True, grad(raa, ours))
    runs["authors' RAA (plain autograd)"] = grad(authors, theirs)
    return runs


def random_raa(num_features: int, device: torch.device, channel_dim: int = -1) -> dnrt.RAA:
    """An RAA with small random shift weights (a trained one's, not the zero start that equals GELU)."""
    raa = dnrt.RAA(num_features, channel_dim=channel_dim).to(device)
    with torch.no_grad():
        raa.weight.normal_(0, 0.02)
        raa.bias.fill_(0.1)
    return raa


def activation_speed(device: torch.device, sizes: Sizes, fused_rows: bool, table: list) -> None:
    cases = [("[%s] float32" % ", ".join(map(str, sizes.act)), sizes.act, None)]
    if device.type == "cuda":
        cases.append(("[%s] bfloat16 (autocast)" % ", ".join(map(str, sizes.act_bf16)), sizes.act_bf16,
                      torch.bfloat16))
    for label, shape, dtype in cases:
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device, dtype=dtype or torch.float32, requires_grad=True)
        raa = random_raa(shape[-1], device)
        print(f"\n1. RAA forward+backward vs nn.GELU, {label}, {device.type} (goal: default ≤ 1.5×)")
        results = side_by_side(activation_runs(raa, x, fused_rows, dtype), sizes.rounds, sizes.min_time)
        print_rows(results)
        table.append((f"RAA fwd+bwd vs GELU, {label}, default", ratio(results["dnrt.RAA (default)"]), "≤ 1.5×"))
        if "dnrt.RAA set_fused(True)" in results:
            table.append(("the same, set_fused(True)", ratio(results["dnrt.RAA set_fused(True)"]), "keep (1.14×)"))
        table.append(("the same, authors' RAA", ratio(results["authors' RAA (plain autograd)"]), "for reference"))


def channels_first_speed(device: torch.device, sizes: Sizes, fused_rows: bool, table: list) -> None:
    torch.manual_seed(0)
    shape = sizes.nchw
    x = torch.randn(*shape, device=device, requires_grad=True)
    raa = random_raa(shape[1], device, channel_dim=1)
    label = "[%s]" % ", ".join(map(str, shape))
    print(f"\n2. dnrt.RAA({shape[1]}, channel_dim=1) forward+backward vs nn.GELU on an NCHW {label} map, "
          f"{device.type} (goal: default ≤ 1.5×)")
    results = side_by_side(activation_runs(raa, x, fused_rows, None), sizes.rounds, sizes.min_time)
    print_rows(results)
    table.append((f"RAA(channel_dim=1) vs GELU, NCHW {label}, default", ratio(results["dnrt.RAA (default)"]),
                  "≤ 1.5×"))


def vit_tiny(depth: int, drop_path: float = 0.0) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=100, depth=depth,
                             drop_path_rate=drop_path)


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
        loss = F.cross_entropy(model(x), y)
        if arr is not None:
            loss = loss + arr.loss(y)
    loss.backward()
    return sum(kept.values())


def activation_memory(device: torch.device, sizes: Sizes, table: list) -> None:
    torch.manual_seed(0)
    batch = sizes.vit_batch
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 100, (batch,), device=device)
    raa = dnrt.convert(vit_tiny(sizes.vit_depth).to(device), x[:1])
    authors = to_authors_raa(dnrt.convert(vit_tiny(sizes.vit_depth).to(device), x[:1]))
    raa_arr = dnrt.convert(vit_tiny(sizes.vit_depth).to(device), x[:1])
    models = [("GELU", vit_tiny(sizes.vit_depth).to(device), None), ("dnrt RAA", raa, None),
              ("dnrt RAA + ARR", raa_arr, dnrt.ARR(raa_arr, 100)), ("authors' RAA (plain autograd)", authors, None)]
    print(f"\n3. bytes kept for backward, ViT-Tiny patch 4, 32×32, batch {batch} (goal: RAA ≤ 1.05× GELU)")
    base = None
    for name, model, arr in models:
        n = saved_bytes(model, x, y, arr)
        base = base or n
        print(f"   {name:34s} {n / 2**20:9.1f} MiB   {n / base:6.3f}×")
        if name == "dnrt RAA":
            table.append(("bytes kept for backward, RAA vs GELU", f"{n / base:.3f}×", "≤ 1.05×"))


def memory_speed(device: torch.device, sizes: Sizes, table: list) -> None:
    torch.manual_seed(0)
    layers, batch, classes, width = sizes.layers, sizes.memory_batch, sizes.classes, sizes.width
    responses = [torch.randn(batch, width, device=device) for _ in range(layers)]
    targets = torch.randint(0, classes, (batch,), device=device)
    ours = [dnrt.ResponseMemory(classes, width).to(device) for _ in range(layers)]
    theirs = [AuthorsMemory(classes) for _ in range(layers)]
    one, their_one = dnrt.ResponseMemory(classes, layers * width).to(device), AuthorsMemory(classes)

    def each(memories, update) -> Callable[[], None]:
        return lambda: [update(m, r, targets) for m, r in zip(memories, responses)]

    print(f"\n4. memory update, batch {batch}, {classes} classes, {layers} memories of width {width}, {device.type} "
          "(goal ≥ 20× the authors' loop)")
    results = side_by_side({"authors' loop (NumPy rows)": each(theirs, AuthorsMemory.update),
                            "dnrt.ResponseMemory": each(ours, dnrt.ResponseMemory.__call__)},
                           sizes.rounds, sizes.min_time)
    print_rows(results, as_speedup=True)
    table.append((f"memory update, {layers} × {width}, vs the authors' loop", faster(results["dnrt.ResponseMemory"]),
                  "≥ 20× faster"))

    print(f"\n5. the same responses as one memory of width {layers * width} (as ARR keeps them), {device.type} "
          "(goal ≥ 5× the authors' loop on one memory of that width)")
    results = side_by_side({"authors' loop (NumPy rows)": lambda: their_one.update(torch.cat(responses, 1), targets),
                            "dnrt.ResponseMemory": lambda: one(torch.cat(responses, 1), targets)},
                           sizes.rounds, sizes.min_time)
    print_rows(results, as_speedup=True)
    table.append((f"memory update, 1 × {layers * width}, vs the authors' loop", faster(results["dnrt.ResponseMemory"]),
                  "≥ 5× faster"))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def compile_check(device: torch.device, sizes: Sizes, backend: str, table: list) -> None:
    """Whether forward + CE + ``arr.loss`` compiles with ``fullgraph=True``, then breaks and recompilations of the
    step compiled without it; never raises, since a failure here is a finding to report."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    def build():
        torch.manual_seed(0)
        model = dnrt.convert(vit_tiny(sizes.vit_depth).to(device), torch.zeros(1, 3, 32, 32, device=device))
        arr = dnrt.ARR(model, 100)
        return model, arr, lambda x, y: F.cross_entropy(model(x), y) + arr.loss(y)

    batches = [(torch.randn(sizes.vit_batch, 3, 32, 32, device=device),
                torch.randint(0, 100, (sizes.vit_batch,), device=device)) for _ in range(sizes.compile_steps)]
    print(f"\n6. torch.compile of forward + CE + arr.loss, converted ViT-Tiny (depth {sizes.vit_depth}), batch "
          f"{sizes.vit_batch}, backend {backend}, {device.type} "
          "(goal: fullgraph compiles once; 0 breaks, 0 recompiles)")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    try:
        _, _, forward_loss = build()
        compiled = torch.compile(forward_loss, fullgraph=True, backend=counter)
        for x, y in batches[:3]:
            compiled(x, y).backward()
        full = f"ok, {counter.frame_count} compilation(s) in {min(3, len(batches))} steps"
    except Exception as error:  # the finding is the error itself
        full = f"fails: {first_line(error)}"
    print(f"   fullgraph=True: {full}")
    table.append(("torch.compile(fullgraph=True) of forward + CE + arr.loss", full, "compiles once"))

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(backend)
    try:
        model, _, forward_loss = build()
        compiled = torch.compile(forward_loss, backend=counter)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i, (x, y) in enumerate(batches):
            compiled(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 0:
                after_first = counter.frame_count
        breaks = sum(counters["graph_break"].values())
        reason = next(iter(counters["graph_break"]), "")
        step = (f"{breaks} graph break(s), {counter.frame_count - after_first} compilation(s) after step 1 "
                f"in {len(batches)} steps" + (f"; first break: {reason.splitlines()[0][:150]}" if reason else ""))
    except Exception as error:
        step = f"fails: {first_line(error)}"
    print(f"   the step without fullgraph: {step}")
    table.append(("the step compiled without fullgraph", step, "0 breaks, no recompile after step 1"))
    torch._dynamo.reset()


def print_table(table: list) -> None:
    print("\nside by side (ratios: median of the per-round ratios; 'faster': the authors' time over ours)")
    print("| what | measured | goal |\n|---|---|---|")
    for what, value, goal in table:
        print(f"| {what} | {value} | {goal} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-fused", action="store_true",
                        help="skip the set_fused(True) rows (on the CPU its C++ kernels build on first use)")
    parser.add_argument("--compile-backend", default="aot_eager",
                        help="backend of part 6 (graph breaks and recompilations are dynamo's, whatever the backend; "
                             "aot_eager also traces the backward; default %(default)s)")
    parser.add_argument("--malloc-top-pad", type=int, metavar="MIB",
                        help="glibc only: keep this much freed heap instead of returning it to the OS (M_TOP_PAD)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one round: checks that every part runs")
    args = parser.parse_args()
    if args.malloc_top_pad is not None:
        ctypes.CDLL("libc.so.6").mallopt(-2, args.malloc_top_pad << 20)
    device = torch.device(args.device)
    sizes = DRY if args.dry_run else Sizes()
    print(header(device) + (" (dry run: tiny sizes, timings meaningless)" if args.dry_run else ""))
    fused_rows = not args.skip_fused and device.type != "cuda" and not args.dry_run
    table: list = []
    activation_speed(device, sizes, fused_rows, table)
    channels_first_speed(device, sizes, fused_rows, table)
    activation_memory(device, sizes, table)
    memory_speed(device, sizes, table)
    compile_check(device, sizes, "eager" if args.dry_run else args.compile_backend, table)
    print_table(table)


if __name__ == "__main__":
    main()
