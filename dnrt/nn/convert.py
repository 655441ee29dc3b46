"""``convert``: swap the activation modules of any model for RAA (or any activation by name).

One dry forward finds, for every activation module, the width and the channel dimension of what it
receives (channels-last tokens, NCHW maps, or NHWC maps after a Linear as in ConvNeXt), so nothing
about the architecture needs to be known in advance. The same forward counts the functional activation
calls (``F.relu``...) made outside activation modules, which no module swap can reach; every convert
leaves a ``ConversionReport`` (``conversion_report(model)``) and refuses to replace nothing.
"""
from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..errors import DNRTError
from .activations import GDN, make_activation
from .raa import RAA

logger = logging.getLogger("dnrt")

RELU_TYPES: Tuple[Type[nn.Module], ...] = (nn.ReLU,)
OTHER_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.ReLU6, nn.SiLU, nn.ELU, nn.SELU, nn.Softplus, nn.LeakyReLU, nn.Hardswish, nn.Mish, GDN, RAA,
)
# activation classes of libraries a model may hold, looked up only where the library is loaded (dnrt imports none):
# "gelu" computes the exact (erf) GELU, "approx" an approximation of it, "other" another activation
LIBRARY_KINDS: Tuple[Tuple[str, str, str], ...] = (
    ("timm.layers.activations", "GELU", "gelu"),
    ("timm.layers.activations", "GELUTanh", "approx"),
    ("timm.layers.activations", "QuickGELU", "approx"),
    ("timm.layers.activations", "Swish", "other"),
    ("timm.layers.activations", "Mish", "other"),
    ("timm.layers.activations", "HardSwish", "other"),
    ("transformers.activations", "GELUActivation", "gelu"),
    ("transformers.activations", "NewGELUActivation", "approx"),
    ("transformers.activations", "FastGELUActivation", "approx"),
    ("transformers.activations", "GELUTanh", "approx"),
    ("transformers.activations", "PytorchGELUTanh", "approx"),
    ("transformers.activations", "AccurateGELUActivation", "approx"),
    ("transformers.activations", "QuickGELUActivation", "approx"),
    ("transformers.activations", "ClippedGELUActivation", "approx"),
    ("transformers.activations", "SiLUActivation", "other"),
    ("transformers.activations", "MishActivation", "other"),
    ("transformers.activations", "ReLUSquaredActivation", "other"),
)
FUNCTIONAL: Dict[object, str] = {
    **{getattr(F, n): f"F.{n}" for n in ("relu", "relu_", "gelu", "silu", "relu6", "elu", "selu", "leaky_relu",
                                         "hardswish", "mish", "softplus")},
    **{getattr(torch, n): f"torch.{n}" for n in ("relu", "relu_")},
    **{getattr(torch.Tensor, n): f"Tensor.{n}" for n in ("relu", "relu_")},
}


@dataclass
class ConversionReport:
    """What one ``convert`` did: activation modules replaced and kept, by class, and the functional activation
    calls its dry forward saw outside activation modules (which no module swap reaches)."""

    model: str
    activation: str
    replaced: Dict[str, int] = field(default_factory=dict)
    kept: Dict[str, int] = field(default_factory=dict)
    functional: Dict[str, int] = field(default_factory=dict)
    modules: List[Dict[str, object]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The number of activation modules replaced."""
        return sum(self.replaced.values())

    def __str__(self) -> str:
        return (f"dnrt.convert({self.model}): replaced {self.total} with {self.activation!r} "
                f"({_counts(self.replaced)}); kept {_counts(self.kept)}; functional calls {_counts(self.functional)}")

    def to_dict(self) -> Dict[str, object]:
        """Plain types, for a run's config.json or a saved model config."""
        return {"activation": self.activation, "total": self.total, "replaced": dict(self.replaced),
                "kept": dict(self.kept), "functional": dict(self.functional)}


def rebuild(model: nn.Module, modules: List[Dict[str, object]]) -> nn.Module:
    """Put the replacements a ``ConversionReport.modules`` list describes back into a freshly built ``model``
    (no dry forward): how a saved converted model is rebuilt before its weights load."""
    named = dict(model.named_modules(remove_duplicate=False))
    for entry in modules:
        names, widths, dim = list(entry["names"]), list(entry["widths"]), int(entry["channel_dim"])
        missing = [n for n in names if n not in named]
        if missing:
            raise DNRTError(f"{type(model).__name__} has no module {missing[0]!r} to convert as recorded")
        by_width = {int(w): make_activation(str(entry["activation"]), int(w), dim) for w in widths}
        new = next(iter(by_width.values())) if len(by_width) == 1 else WidthDispatch(by_width, dim)
        _set_all(model, named[names[0]], _like_model(new, model))
    return model


def _counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in counts.items()) or "none"


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report of the last ``convert`` of ``model``."""
    report = model.__dict__.get("_dnrt_conversion")
    if report is None:
        raise DNRTError(f"{type(model).__name__} has not been converted by dnrt.convert")
    return report


def activation_kind(module: nn.Module) -> Optional[str]:
    """``"gelu"`` (exact, erf), ``"relu"``, ``"approx"`` (an approximated GELU), ``"other"`` (another activation
    class convert knows), or None."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "approx"
    if isinstance(module, RELU_TYPES):
        return "relu"
    for module_name, class_name, kind in LIBRARY_KINDS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(module, cls):
            return kind
    return "other" if isinstance(module, OTHER_TYPES) else None


def gelu_types() -> Tuple[Type[nn.Module], ...]:
    """PyTorch's GELU, and the exact GELU classes of timm and transformers where they are loaded."""
    loaded = (getattr(sys.modules.get(m), c, None) for m, c, kind in LIBRARY_KINDS if kind == "gelu")
    return (nn.GELU,) + tuple(cls for cls in loaded if isinstance(cls, type))


def _display(module: nn.Module) -> str:
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return f"GELU(approximate={module.approximate!r})"
    return type(module).__name__


class WidthDispatch(nn.Module):
    """Stands in for one activation module that a model calls on inputs of several widths.

    (torchvision's Bottleneck calls one ``relu`` at two widths.) Holds one replacement per width.
    """

    def __init__(self, by_width: Dict[int, nn.Module], channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.by_width = nn.ModuleDict({str(w): m for w, m in by_width.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(int(x.shape[self.channel_dim]))  # int: a tracer records sizes as tensors
        for width, module in self.by_width.items():  # a loop, not by_width[key]: TorchScript unrolls it
            if width == key:
                return module(x)
        raise DNRTError(f"no converted activation for width {key}; "
                        f"widths seen at conversion: {list(self.by_width.keys())}")


def convert(
    model: nn.Module,
    example_input,
    activation: str = "raa",
    replace: Union[None, str, Sequence[Type[nn.Module]]] = None,
    strict: bool = True,
) -> nn.Module:
    """Replace activation modules in ``model`` (in place; also returned) after one dry forward.

    ``replace=None``: exact GELU modules (PyTorch's, timm's, transformers') become ``activation``; ReLU modules too,
    as ``raa_relu`` when ``activation="raa"``. An untrained RAA equals the GELU/ReLU it replaces, so logits are
    unchanged (docs/method.md §1). Approximated GELUs (tanh, quick) and other activations are kept, with a
    warning naming them: ``replace="all"`` (or their types) converts them too, and moves the outputs at step 0.
    Replacing nothing raises ``DNRTError`` naming the activation classes and functional calls found (a warning
    with ``strict=False``). ``conversion_report(model)`` tells what was replaced; the line is logged on ``dnrt``.
    """
    chosen = _chooser(replace)
    calls, found, functional = _trace(model, example_input, chosen)
    replaced: Counter = Counter()
    done = []
    names = _names(model)
    for seen in calls.values():
        module = seen[0][0]
        by_width, name = {}, _activation_name(module, activation, replace)
        for _, width, dim in seen:
            by_width.setdefault((width, dim), make_activation(name, num_features=width, channel_dim=dim))
        new = next(iter(by_width.values())) if len(by_width) == 1 else WidthDispatch(
            {w: m for (w, _), m in by_width.items()}, seen[0][2])
        _set_all(model, module, _like_model(new, model))
        replaced[_display(module)] += 1
        done.append({"names": names[id(module)], "activation": name, "channel_dim": seen[0][2],
                     "widths": [w for w, _ in by_width]})
    kept = {name: n - replaced.get(name, 0) for name, n in found.items() if n > replaced.get(name, 0)}
    report = ConversionReport(type(model).__name__, activation, dict(replaced), kept, functional, done)
    model.__dict__["_dnrt_conversion"] = report
    logger.info("%s", report)
    _check(report, replace, strict, sum(isinstance(m, RAA) for m in model.modules()))
    if report.total and _is_hf_model(model):
        from ..integrations.hf import record_conversion

        record_conversion(model, report)
    return model


def _is_hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name under which each module sits in ``model``."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _check(report: ConversionReport, replace, strict: bool, raas: int) -> None:
    """Refuse (or warn about) a convert that replaced nothing; warn about activations kept or moved at step 0."""
    approx = [name for name in report.replaced if name.startswith("GELU(") or _is_approx_name(name)]
    if approx and _gelu_based(report.activation):
        warnings.warn(f"dnrt.convert: {', '.join(approx)} converted to the erf-based {report.activation!r}: "
                      "the outputs move at step 0 (by up to about 5e-4 per activation)", stacklevel=3)
    option = f"replace='all' or replace=({', '.join(report.kept) or 'TYPES'},)"
    if report.total == 0:
        found = (f"activation modules kept: {_counts(report.kept)} (converted only on request: {option}, which "
                 "moves the outputs at step 0)") if report.kept else "no activation modules"
        calls = (f"; functional activation calls in its forward, which convert cannot replace: "
                 f"{_counts(report.functional)}") if report.functional else ""
        held = f" (it already holds {raas} RAA modules)" if raas else ""
        message = f"dnrt.convert replaced nothing in {report.model}{held}: {found}{calls}"
        if strict:
            raise DNRTError(message)
        warnings.warn(message, stacklevel=3)
    elif report.kept and replace is None:
        warnings.warn(f"dnrt.convert kept {_counts(report.kept)} in {report.model} ({option} converts them too)",
                      stacklevel=3)


def _is_approx_name(name: str) -> bool:
    return any(cls == name and kind == "approx" for _, cls, kind in LIBRARY_KINDS)


def _gelu_based(name: str) -> bool:
    return name in ("raa", "gelu")


def _chooser(replace):
    """A predicate: whether convert replaces this activation module."""
    if replace is None:
        return lambda module: activation_kind(module) in ("gelu", "relu")
    if replace == "all":
        return lambda module: activation_kind(module) is not None
    if isinstance(replace, str):
        raise DNRTError(f"convert: replace must be None, 'all' or module types, got {replace!r}")
    types = tuple(replace)
    return lambda module: isinstance(module, types)


def _activation_name(module: nn.Module, activation: str, replace) -> str:
    """The make_activation name that replaces ``module``: ``raa_relu`` for ReLU by default, else ``activation``."""
    if activation == "raa" and replace is None and isinstance(module, RELU_TYPES):
        return "raa_relu"
    return activation


class _FunctionalCalls(TorchFunctionMode):
    """Counts functional activation calls made outside activation modules (``depth[0] == 0``)."""

    def __init__(self, depth: List[int]) -> None:
        super().__init__()
        self.depth, self.counts = depth, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = FUNCTIONAL.get(func)
        if name is not None and self.depth[0] == 0:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _trace(model: nn.Module, example_input, chosen):
    """Run ``model`` once in eval mode; record (module, width, channel_dim) for each call of a chosen activation
    module, the activation modules found by display name, and the functional activation calls outside them."""
    calls: Dict[int, List[Tuple[nn.Module, int, int]]] = {}
    last: List[Optional[Tuple[nn.Module, torch.Size]]] = [None]
    depth = [0]

    def on_leaf(module, args, output):
        if isinstance(output, torch.Tensor) and any(True for _ in module.parameters(recurse=False)):
            last[0] = (module, output.shape)

    def on_activation(module, args):
        x = args[0]
        dim = _channel_dim(x, last[0])
        calls.setdefault(id(module), [])
        entry = (module, x.shape[dim], dim)
        if entry[1:] not in [c[1:] for c in calls[id(module)]]:
            calls[id(module)].append(entry)

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    handles, found = [], Counter()
    for module in model.modules():
        is_chosen = chosen(module) and not isinstance(module, WidthDispatch)
        if is_chosen or activation_kind(module) is not None:
            if is_chosen or not isinstance(module, (RAA, GDN)):  # dnrt's own count only when asked for
                found[_display(module)] += 1
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        if is_chosen:
            handles.append(module.register_forward_pre_hook(on_activation))
        elif not list(module.children()):
            handles.append(module.register_forward_hook(on_leaf))
    was_training = model.training
    model.eval()
    mode = _FunctionalCalls(depth)
    try:
        with torch.no_grad(), mode:
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls, dict(found), dict(mode.counts)


def _channel_dim(x: torch.Tensor, producer: Optional[Tuple[nn.Module, torch.Size]]) -> int:
    """-1 for vectors and tokens; for maps, 1 unless the tensor came straight from a Linear/LayerNorm (NHWC)."""
    if x.dim() <= 3:
        return -1
    if producer is not None and producer[1] == x.shape and (
        isinstance(producer[0], nn.Linear) or type(producer[0]) is nn.LayerNorm
    ):
        return -1
    return 1


def _set_all(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (a module can sit under several names)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def _like_model(new: nn.Module, model: nn.Module) -> nn.Module:
    """Move a replacement to the model's device and floating dtype."""
    param = next(model.parameters(), None)
    return new if param is None else new.to(device=param.device, dtype=param.dtype)
