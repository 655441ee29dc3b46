"""`dnrt profile`: parameters, multiply-adds per image and latency, original activation vs DNRT (Table 4).

Counting convention: one multiply-add (MAC) is counted once and reported as "FLOPs", as timm and the
paper do (ViT-Tiny at 224×224: 1.08 G). PyTorch's FlopCounterMode counts 2 per MAC; we halve it. The
headline number is the paper's: the multiply-adds of layers with weights (linear, convolution) plus
RAA's shift wᵀx (d per feature vector); the parameter-free attention products (QKᵀ and AV) are reported
in their own column, since the paper's 1.078 G leaves them out. Latency is of eager inference and, with
`--compile [MODE]`, also of the `torch.compile`d model (compilation excluded).
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dnrt.errors import DNRTError

ATTENTION_OPS = {torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten._scaled_dot_product_flash_attention,
                 torch.ops.aten._scaled_dot_product_efficient_attention,
                 torch.ops.aten._scaled_dot_product_cudnn_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu}


def _cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, with PyTorch's own formula for its CUDA siblings."""
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# PyTorch's table lacks the CPU attention kernel; with it a CPU count equals a CUDA count.
CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def raa_shift_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one RAA's shift on `x`: d per vector (wᵀx), d² per vector (Wx), none for a constant."""
    if module.shift == "scalar":
        return 0
    return x.numel() * (module.num_features if module.shift == "elementwise" else 1)


def _raa_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's RAA modules under FlopCounterMode's names (class name of the root, then the module path)."""
    from dnrt import RAA
    return {f"{type(model).__name__}.{name}": mod for name, mod in model.named_modules() if isinstance(mod, RAA)}


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of one forward of `example`: paper convention (weights + RAA), RAA's share, attention products.

    RAA's shift is a product-and-sum the flop counter does not see (nor a compiled kernel), so it is counted by
    its definition in a forward hook; whatever the counter saw inside RAA is replaced by that count.
    """
    raa = _raa_modules(model)
    shift: list[int] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        shift.append(raa_shift_macs(module, args[0]))

    hooks = [module.register_forward_hook(hook) for module in raa.values()]
    try:
        with FlopCounterMode(display=False, depth=None, custom_mapping=CUSTOM_FLOPS) as counter:
            model(example)
    finally:
        for handle in hooks:
            handle.remove()
    counts = counter.get_flop_counts()
    inside_raa = sum(sum(counts.get(name, {}).values()) for name in raa)
    raa_attention = sum(counts.get(name, {}).get(op, 0) for name in raa for op in ATTENTION_OPS)
    attention = sum(n for op, n in counts["Global"].items() if op in ATTENTION_OPS) - raa_attention
    return {"macs": (counter.get_total_flops() - inside_raa - attention) // 2 + sum(shift), "raa_macs": sum(shift),
            "attention_macs": attention // 2}


def median_latency(fn, min_run_time: float, warmup: int = 3) -> float:
    """Median seconds of one call of `fn` after `warmup` calls (first-call kernel compiles), with
    torch.utils.benchmark."""
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _inference(model: nn.Module, x: torch.Tensor):
    """A no-grad forward, the thing whose latency Table 4 reports."""
    def step():
        with torch.inference_mode():
            model(x)
    return step


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, arr: Optional[nn.Module]):
    """Forward, cross-entropy (+ ARR loss), backward: the cost ARR adds shows here, not in inference."""
    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        if arr is not None:
            loss = loss + arr.loss(y)
        loss.backward()
    return step


def profile_one(model: nn.Module, img_size: int, batch_size: int, device: str, min_run_time: float,
                compile_mode: Optional[str] = None) -> dict[str, Any]:
    """Parameters, MACs per image (counted on CPU at batch 1) and median latency of a built model; with
    `compile_mode`, also the latency of `torch.compile(model, mode=compile_mode)` (its compilation is not timed)."""
    model = model.eval().cpu()
    counts = count_macs(model, torch.randn(1, 3, img_size, img_size))
    model.to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    row = {"params": sum(p.numel() for p in model.parameters()), **counts,
           "latency_ms": 1e3 * median_latency(_inference(model, x), min_run_time)}
    if compile_mode is not None:
        compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        row["compiled_latency_ms"] = 1e3 * median_latency(_inference(compiled, x), min_run_time)
    return row


def arr_cost(model: nn.Module, num_classes: int, img_size: int, batch_size: int, device: str,
             min_run_time: float) -> dict[str, Any]:
    """What ARR adds in training: its memory (K × Σ d_j floats) and the train-step time with and without it."""
    from dnrt import ARR
    model = model.to(device).train()
    x = torch.randn(max(batch_size, 2), 3, img_size, img_size, device=device)
    y = torch.arange(x.shape[0], device=device) % num_classes
    without = median_latency(_train_step(model, x, y, None), min_run_time)
    arr = ARR(model, num_classes).to(device).train()
    with_arr = median_latency(_train_step(model, x, y, arr), min_run_time)
    memory = sum(b.numel() * b.element_size() for b in arr.buffers())  # the class means (and counts)
    result = {"arr_layers": len(arr.layers), "arr_memory_bytes": memory, "train_step_ms": 1e3 * without,
              "train_step_arr_ms": 1e3 * with_arr, "train_batch_size": x.shape[0]}
    arr.remove()
    return result


def profile_model(name: str, act: str = "raa", arr: bool = False, batch_size: int = 1, device: str = "cpu",
                  img_size: int = 224, num_classes: int = 1000, min_run_time: float = 1.0,
                  model_lib: Optional[str] = None, compile_mode: Optional[str] = None) -> dict[str, Any]:
    """Profile `name` with its own activation and with `act` (DNRT), as two rows of a table; with `compile_mode`
    (a `torch.compile` mode, or "default"), also their compiled inference latency."""
    from dnrt.tool.models import create_model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DNRTError("--device cuda asked for, but no CUDA device is available")
    rows = {}
    for label, activation in (("original", None), (act, act)):
        torch.manual_seed(0)
        model = create_model(name, num_classes, img_size=img_size, act=activation, model_lib=model_lib)
        rows[label] = profile_one(model, img_size, batch_size, device, min_run_time, compile_mode)
        if arr and activation is not None:
            rows[label].update(arr_cost(model, num_classes, img_size, batch_size, device, min_run_time))
    return {"model": name, "img_size": img_size, "num_classes": num_classes, "batch_size": batch_size,
            "device": device, "compile": compile_mode,
            "convention": "1 multiply-add = 1 FLOP; attention products excluded", "rows": rows}


def format_profile(result: dict[str, Any]) -> str:
    """A Markdown table of profile_model's rows, Table 4's columns plus the attention products."""
    compiled = result.get("compile")
    head = ["activation", "params (M)", "GFLOPs (MACs)", "of which RAA (M)", "attention products (G)",
            f"latency (ms, batch {result['batch_size']}, {result['device']})"]
    if compiled:
        head.append(f"compiled latency (ms, {compiled})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in result["rows"].items():
        cells = [label, f"{row['params'] / 1e6:.3f}", f"{row['macs'] / 1e9:.4f}", f"{row['raa_macs'] / 1e6:.3f}",
                 f"{row['attention_macs'] / 1e9:.4f}", f"{row['latency_ms']:.2f}"]
        if compiled:
            cells.append(f"{row['compiled_latency_ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{result['model']} at {result['img_size']}×{result['img_size']}, {result['num_classes']} classes; "
             "GFLOPs count one multiply-add once (timm's and the paper's convention), without attention products."]
    for label, row in result["rows"].items():
        if "arr_layers" in row:
            notes.append(f"ARR ({label}): {row['arr_layers']} tapped layers, "
                         f"memory {row['arr_memory_bytes'] / 1e6:.3f} MB; "
                         f"train step (batch {row['train_batch_size']}) {row['train_step_ms']:.2f} ms without ARR, "
                         f"{row['train_step_arr_ms']:.2f} ms with ARR.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `dnrt profile`."""
    parser.add_argument("-m", "--model", required=True, help="model name, as in a config's `model`")
    parser.add_argument("--model-lib", default=None, choices=("timm", "torchvision"),
                        help="take any model of that library by name instead of the tool's registry")
    parser.add_argument("--act", default="raa", help="activation to compare with the model's own (default raa)")
    parser.add_argument("--arr", action="store_true", help="also measure ARR's memory and train-step cost")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (FLOPs are always counted on CPU)")
    parser.add_argument("--img-size", type=int, default=224, help="input size (default 224, as in Table 4)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        help="also time inference of the torch.compile'd model, in this mode (default: default)")
    parser.add_argument("--out", default=None, help="also write the table (.md) and numbers (.json) here")


def run(args: argparse.Namespace) -> int:
    """Print the profile table; with --out, write it and its numbers."""
    if args.batch_size < 1 or args.img_size < 1 or args.num_classes < 1:
        raise DNRTError("--batch-size, --img-size and --num-classes must be positive")
    result = profile_model(args.model, args.act, args.arr, args.batch_size, args.device, args.img_size,
                           args.num_classes, args.min_time, args.model_lib, args.compile)
    table = format_profile(result)
    print(table, end="")
    if args.out:
        from dnrt.tool import rundir

        path = rundir.output_path(args.out, ".", "profile.md")
        rundir.write_text(path, table)
        rundir.write_json(path.with_suffix(".json"), result)
        print(f"written: {path}")
    return 0
