"""``convert``: swap the activation modules of any model for RAA (or any activation by name).

One dry forward finds, for every activation module, the width and the channel dimension of what it
receives (channels-last tokens, NCHW maps, or NHWC maps after a Linear as in ConvNeXt), so nothing
about the architecture needs to be known in advance.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..errors import DNRTError
from .activations import GDN, make_activation
from .raa import RAA

RELU_TYPES: Tuple[Type[nn.Module], ...] = (nn.ReLU,)
OTHER_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.ReLU6, nn.SiLU, nn.ELU, nn.SELU, nn.Softplus, nn.LeakyReLU, nn.Hardswish, GDN, RAA,
)


def gelu_types() -> Tuple[Type[nn.Module], ...]:
    """PyTorch's GELU, and timm's where timm is loaded (no model can hold one before): the core never imports timm."""
    timm_activations = sys.modules.get("timm.layers.activations")
    return (nn.GELU,) + ((timm_activations.GELU,) if timm_activations is not None else ())


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
) -> nn.Module:
    """Replace activation modules in ``model`` (in place; also returned) after one dry forward.

    ``replace=None``: GELU modules (PyTorch's and timm's) become ``activation``; ReLU modules too, as
    ``raa_relu`` when ``activation="raa"``. ``replace="all"``: these and every type in ``OTHER_TYPES``.
    Or a tuple of module types. An untrained RAA equals the GELU/ReLU it replaces, so logits are unchanged.
    """
    types = _types(replace)
    calls = _trace(model, example_input, types)
    for seen in calls.values():
        module = seen[0][0]
        by_width = {}
        for _, width, dim in seen:
            by_width.setdefault((width, dim), _replacement(module, activation, replace, width, dim))
        new = next(iter(by_width.values())) if len(by_width) == 1 else WidthDispatch(
            {w: m for (w, _), m in by_width.items()}, seen[0][2])
        _set_all(model, module, _like_model(new, model))
    return model


def _types(replace) -> Tuple[Type[nn.Module], ...]:
    if replace is None:
        return gelu_types() + RELU_TYPES
    if replace == "all":
        return gelu_types() + RELU_TYPES + OTHER_TYPES
    if isinstance(replace, str):
        raise DNRTError(f"convert: replace must be None, 'all' or module types, got {replace!r}")
    return tuple(replace)


def _replacement(module: nn.Module, activation: str, replace, width: int, dim: int) -> nn.Module:
    name = activation
    if activation == "raa" and replace is None and isinstance(module, RELU_TYPES):
        name = "raa_relu"
    return make_activation(name, num_features=width, channel_dim=dim)


def _trace(model: nn.Module, example_input, types) -> Dict[int, List[Tuple[nn.Module, int, int]]]:
    """Run ``model`` once in eval mode; record (module, width, channel_dim) for each activation call."""
    calls: Dict[int, List[Tuple[nn.Module, int, int]]] = {}
    last: List[Optional[Tuple[nn.Module, torch.Size]]] = [None]

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

    handles = []
    for module in model.modules():
        if isinstance(module, types) and not isinstance(module, WidthDispatch):
            handles.append(module.register_forward_pre_hook(on_activation))
        elif not list(module.children()):
            handles.append(module.register_forward_hook(on_leaf))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


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
