"""The authors' activation names (their ``qtcls.modules.DNRT``) as classes of this package.

A config written for the authors' tool runs here with its import changed to ``from dnrt.compat import *``:
``model_kwargs = dict(act_layer=RAA)`` trains what it trains there. The tool does not pass these classes to
the model's constructor; it records them by name ("dnrt.compat.RAA") and swaps them in with ``dnrt.convert``
(see ``from_act_layer``), so every model of the tool takes them. Each class is also a plain module:

- ``GELU``, ``ReLU``: the exact (erf) GELU and ReLU.
- ``RAA``: GELU-based RAA with the paper's vector shift ``wᵀx + b`` (docs/method.md §1); ``RAA_CNN``: the same
  on NCHW maps (``channel_dim=1``, no permute); ``SimpleRAA``: one learned scalar shift; ``ElementWiseRAA``:
  a d×d shift ``Wx + b`` (the ablations).
- ``RAA2``, ``RAA2_CNN``, ``SimpleRAA2``, ``ElementWiseRAA2``: the same four on a ReLU base, ``max(0, x + s)``.

Unlike the authors' ``SimpleRAA()``, the scalar forms take ``num_features``: ``dnrt.RAA`` checks its input's width.

A config in the authors' form (its activation chosen by ``model_kwargs = dict(act_layer=...)``) also gets their ARR
layer weighting, ``ARR_LAYER_WEIGHTING``, unless it sets ``arr_layer_weighting`` itself.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .errors import DNRTError
from .nn.raa import RAA as _RAA

__all__ = ["GELU", "ReLU", "RAA", "RAA2", "SimpleRAA", "SimpleRAA2", "ElementWiseRAA", "ElementWiseRAA2",
           "RAA_CNN", "RAA2_CNN"]


class GELU(nn.GELU):
    """The exact GELU ``x·Φ(x)``."""


class ReLU(nn.ReLU):
    """``max(0, x)``."""


def _raa_class(class_name: str, base: str, shift: str, channel_dim: int, doc: str) -> type:
    def __init__(self, num_features: int) -> None:
        _RAA.__init__(self, num_features, base=base, shift=shift, channel_dim=channel_dim)

    return type(class_name, (_RAA,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


RAA = _raa_class("RAA", "gelu", "vector", -1, "``x·Φ(x + wᵀx + b)`` over the last dimension.")
RAA_CNN = _raa_class("RAA_CNN", "gelu", "vector", 1, "``x·Φ(x + wᵀx + b)`` over the channels of NCHW maps.")
SimpleRAA = _raa_class("SimpleRAA", "gelu", "scalar", -1, "``x·Φ(x + b)`` with one learned scalar ``b``.")
ElementWiseRAA = _raa_class("ElementWiseRAA", "gelu", "elementwise", -1, "``x·Φ(x + Wx + b)``, ``W`` d×d.")
RAA2 = _raa_class("RAA2", "relu", "vector", -1, "``max(0, x + wᵀx + b)`` over the last dimension.")
RAA2_CNN = _raa_class("RAA2_CNN", "relu", "vector", 1, "``max(0, x + wᵀx + b)`` over the channels of NCHW maps.")
SimpleRAA2 = _raa_class("SimpleRAA2", "relu", "scalar", -1, "``max(0, x + b)`` with one learned scalar ``b``.")
ElementWiseRAA2 = _raa_class("ElementWiseRAA2", "relu", "elementwise", -1, "``max(0, x + Wx + b)``, ``W`` d×d.")

# how the authors' code averages ARR's per-layer losses (dnrt.ARR's layer_weighting, docs/method.md §3)
ARR_LAYER_WEIGHTING = "reference"

# the activation each act_layer stands for: (a dnrt.make_activation name, RAA's shift form or None)
ACT_LAYERS: dict[str, tuple[str, str | None]] = {
    "dnrt.compat.GELU": ("gelu", None), "torch.nn.GELU": ("gelu", None),
    "dnrt.compat.ReLU": ("relu", None), "torch.nn.ReLU": ("relu", None),
    "dnrt.compat.RAA": ("raa", "vector"), "dnrt.compat.RAA_CNN": ("raa", "vector"),
    "dnrt.compat.SimpleRAA": ("raa", "scalar"), "dnrt.compat.ElementWiseRAA": ("raa", "elementwise"),
    "dnrt.compat.RAA2": ("raa_relu", "vector"), "dnrt.compat.RAA2_CNN": ("raa_relu", "vector"),
    "dnrt.compat.SimpleRAA2": ("raa_relu", "scalar"), "dnrt.compat.ElementWiseRAA2": ("raa_relu", "elementwise"),
}
_CLASSES: dict[type, str] = {nn.GELU: "torch.nn.GELU", nn.ReLU: "torch.nn.ReLU",
                             **{globals()[n]: f"dnrt.compat.{n}" for n in __all__}}


def act_layer_name(act_layer: Any) -> str:
    """The recorded name of an ``act_layer`` (a class of this module, torch.nn.GELU/ReLU, or such a name)."""
    if isinstance(act_layer, type) and act_layer in _CLASSES:
        return _CLASSES[act_layer]
    if isinstance(act_layer, str) and act_layer in ACT_LAYERS:
        return act_layer
    raise ValueError(f"act_layer must be one of {', '.join(ACT_LAYERS)}, got {act_layer!r}")


def from_act_layer(act_layer: Any, act: str | None) -> tuple[str | None, str | None]:
    """``(act, shift)`` for a model with ``act_layer`` (or None) and the config's ``act``; they must agree."""
    if act_layer is None:
        return act, None
    try:
        wanted, shift = ACT_LAYERS[act_layer_name(act_layer)]
    except ValueError as e:
        raise DNRTError(f"model_kwargs: {e}") from None
    if act is not None and act != wanted:
        raise DNRTError(f"act={act!r} contradicts model_kwargs act_layer={act_layer_name(act_layer)} "
                        f"(which means act={wanted!r}); set one of them")
    return wanted, shift


def set_shift(model: nn.Module, shift: str) -> nn.Module:
    """Give every RAA of ``model`` the shift form ``shift`` (fresh zero parameters, so still GELU/ReLU)."""
    replaced: dict[int, nn.Module] = {}  # a module registered under several names stays one module
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _RAA) and child.shift != shift:
                if id(child) not in replaced:
                    new = _RAA(child.num_features, base=child.base, shift=shift, channel_dim=child.channel_dim)
                    replaced[id(child)] = new.to(child.bias.device, child.bias.dtype)
                setattr(parent, child_name, replaced[id(child)])
    return model
