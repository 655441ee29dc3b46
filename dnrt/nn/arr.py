"""Aggregated Response Regularization (docs/method.md §3) on any model, through forward hooks.

``ARR`` taps chosen modules, reduces each output to one response vector per sample (class token,
token mean or global average pool), and after the model's normal forward returns
``weight · (1/J) Σ_j mean|r_j − μ_j|`` against per-class running means kept in ``ResponseMemory``.
The model's forward is untouched, so DDP, AMP, ``torch.compile`` and inference work as before.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import DNRTError
from .memory import ResponseMemory

logger = logging.getLogger("dnrt")
REDUCTIONS = ("auto", "cls", "mean", "pool")
LAYER_WEIGHTINGS = ("paper", "reference")
# Hugging Face model types whose sequences start with a class token ([CLS]) that their heads read
HF_CLASS_TOKEN_TYPES = frozenset({
    "vit", "deit", "beit", "dinov2", "data2vec-vision", "bert", "roberta", "xlm-roberta", "camembert", "electra",
    "albert", "distilbert", "data2vec-text", "ernie", "mpnet", "deberta", "deberta-v2", "modernbert",
})


class ARR(nn.Module):
    """Aggregated Response Regularization for ``model``; its only state is ``arr.memory``.

    ``layers``: ``"auto"`` (see ``find_layers``) or module names. ``reduce``: ``"auto"``, ``"cls"``
    (token 0), ``"mean"`` (over tokens), ``"pool"`` (global average pool of a channels-first map).
    ``"auto"`` takes the class token where the model has one (timm's ``cls_token``, a Hugging Face ViT/DeiT/BERT/
    RoBERTa...), the token mean for other sequences, the pool for maps; ``arr.chosen`` maps each layer to the
    reduction used (also in the repr, and logged on ``dnrt`` once). Of a block returning a tuple, the hidden
    states are taken (the first entry for Hugging Face models, else the last).
    ``sync``: under ``torch.distributed``, gather every process's responses before updating the memory.
    The per-class means of all tapped layers live side by side in one ``ResponseMemory`` (widths
    concatenated in ``layers`` order): one update and, under DDP, one gather per step.
    ``layer_weighting``: how the per-layer losses are averaged (docs/method.md §3): ``"paper"`` (default) over
    the layers, ``(1/J) Σ_j L_j``; ``"reference"`` (the authors' code) over the layers of each width, then over
    the widths. The two agree when all tapped layers have one width (a ViT).

    A forward is a training forward when ARR and the model are in training mode and gradients are
    enabled. Each training forward's responses wait in order until a ``loss`` in that state takes them,
    so several training forwards before their losses (gradient accumulation by hand, two views) pair up
    first with first; more than ``max_pending`` waiting forwards is an error, since a forgotten ``loss``
    would otherwise hold every forward's graph (``arr.max_pending = 1`` makes a second forward before its
    loss an error). A forward abandoned after an exception stays waiting: ``arr.clear()`` drops it (one
    that stopped part-way is refused at the next loss). Only those losses update the memory. Any other forward
    (under ``torch.no_grad()``, ``torch.inference_mode()`` or in eval mode) leaves them alone: its responses
    serve the next ``loss`` outside that state, which reads the memory without writing it. A recomputation
    during backward (activation checkpointing) is not a forward. The queues are plain lists whose keys are
    fixed at construction, so ``torch.compile`` traces a forward and its ``loss`` in one graph, once.
    ``arr.responses`` keeps the last reduced response of each layer, whatever the forward. The model
    is not a submodule: ``state_dict`` holds only the memory.

    Copies: the taps belong to this ARR, not to the model. A copy of the model alone (``copy.deepcopy``,
    ``torch.save``/``torch.load``, EMA and weight-averaging wrappers such as timm's ``ModelEmaV3`` and
    ``torch.optim.swa_utils.AveragedModel``) carries inert taps: its forwards never reach this ARR, and the
    copy needs no ARR for inference (attach a new ``ARR`` to it if it trains with one). A copy of the ARR
    (alone or with its model, e.g. a module holding both) is the same ARR on the copy of its model: the memory
    is copied, the waiting responses are not, and it taps the copied model afresh.
    """

    max_pending = 8

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        layers: Union[str, Sequence[str]] = "auto",
        reduce: str = "auto",
        momentum: float = 0.1,
        order: str = "reference",
        weight: float = 1.0,
        sync: bool = True,
        layer_weighting: str = "paper",
    ) -> None:
        super().__init__()
        if reduce not in REDUCTIONS:
            raise DNRTError(f"unknown ARR reduce {reduce!r}; known: {', '.join(REDUCTIONS)}")
        if layer_weighting not in LAYER_WEIGHTINGS:
            raise DNRTError(f"unknown ARR layer_weighting {layer_weighting!r}; known: {', '.join(LAYER_WEIGHTINGS)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise DNRTError(f"ARR needs a positive integer num_classes, got {num_classes!r}")
        self._model = [model]
        self.layers: List[str] = find_layers(model) if layers == "auto" else list(layers)
        if not self.layers:
            raise DNRTError("ARR needs at least one layer to tap")
        modules = dict(model.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise DNRTError(f"ARR: no module named {missing[0]!r} in {type(model).__name__}")
        self.num_classes, self.reduce, self.weight = num_classes, reduce, weight
        self.layer_weighting = layer_weighting
        self.chosen: Dict[str, str] = {}
        self._hf = _hf_config(model) is not None
        self._hf_cls = _hf_class_token(model)
        self._memory_options = dict(momentum=momentum, order=order, sync=sync)
        ResponseMemory(num_classes, 1, **self._memory_options)  # fail early on a bad momentum or order
        self.register_module("memory", None)
        self._register_load_state_dict_pre_hook(_make_memory_for_state, with_module=True)
        self._width_hints = [_width_hint(model, name) for name in self.layers]
        if None not in self._width_hints:  # made now, so that a compiled first step finds it; checked on every loss
            device = next((p.device for p in model.parameters()), None)
            self.make_memory(sum(self._width_hints)).to(device)
        self._reset()
        self._tap()

    def _reset(self) -> None:
        """No responses yet: empty queues, whose keys stay fixed from here on (see the class doc)."""
        self.responses: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(self.layers)
        self._pending: Dict[str, List[torch.Tensor]] = {name: [] for name in self.layers}
        self._untrained: Dict[str, torch.Tensor] = {}

    def _tap(self) -> None:
        """Register this ARR's forward hooks on the tapped modules of its model."""
        modules = dict(self._model[0].named_modules())
        self._handles = [modules[name].register_forward_hook(_Tap(self, name, hint))
                         for name, hint in zip(self.layers, self._width_hints)]

    def __getstate__(self) -> dict:
        """The state a copy or a pickle takes: the memory and options, with no waiting responses and no hooks."""
        state = super().__getstate__()
        state.update(_handles=[], _tapped=bool(self._handles), responses=None, _pending=None, _untrained=None)
        return state

    def __setstate__(self, state: dict) -> None:
        """A copied or unpickled ARR taps the copy of its model (see the class doc)."""
        state = dict(state)
        tapped = state.pop("_tapped", False)
        super().__setstate__(state)
        self._reset()
        if tapped:
            self._tap()

    def _record(self, name: str, width_hint: Optional[int], output) -> None:
        """A tapped module's forward hook: reduce its output and queue it for the next loss (see the class doc)."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # run by autograd during backward: a recomputation of a forward already recorded
        r = self.responses[name] = self._reduce(output, width_hint, name)
        if not self._training():
            self._untrained[name] = r
            return
        pending = self._pending[name]
        if len(pending) >= self.max_pending:
            raise DNRTError(
                f"ARR: {len(pending)} training forwards are waiting for arr.loss(); call arr.loss(targets) "
                "after each training forward, or run forwards that need no ARR loss under torch.no_grad()"
            )
        pending.append(r)

    def _training(self) -> bool:
        """Whether a forward or loss now is a training one (ARR and model in training mode, gradients on)."""
        return self.training and self._model[0].training and torch.is_grad_enabled()

    def _take(self, training: bool) -> List[torch.Tensor]:
        """The responses the next loss uses: the oldest waiting training forward, or the last other forward."""
        if training:
            pending = [self._pending[name] for name in self.layers]
            if len({len(queue) for queue in pending}) > 1:  # a forward stopped part-way (an exception)
                counts = ", ".join(f"{name} {len(queue)}" for name, queue in zip(self.layers, pending))
                raise DNRTError(f"ARR: the tapped layers hold different numbers of waiting responses ({counts}); "
                                "a forward stopped part-way: call arr.clear() before going on")
            if pending[0]:
                return [queue.pop(0) for queue in pending]
            hint = (" (the last forward ran under torch.no_grad(), torch.inference_mode() or in eval mode)"
                    if self._untrained else "")
            raise DNRTError(
                f"ARR.loss() in training needs a training forward pass first{hint}; with torch.compile, "
                "create ARR before the first compiled call: hooks added later are not seen"
            )
        if len(self._untrained) != len(self.layers):
            raise DNRTError(
                "ARR.loss() needs a forward pass of the model first (with torch.compile, create ARR before the "
                "first compiled call: hooks added later are not seen)"
            )
        return [self._untrained.pop(name) for name in self.layers]

    def clear(self) -> None:
        """Drop every waiting response, e.g. of a forward whose step was abandoned after an exception."""
        for queue in self._pending.values():
            queue.clear()
        self._untrained.clear()

    def make_memory(self, width: int) -> ResponseMemory:
        """Create the memory of all tapped layers side by side (from the layers' widths, or when loading state)."""
        self.memory = ResponseMemory(self.num_classes, width, **self._memory_options)
        return self.memory

    def _reduce(self, output, width_hint: Optional[int], name: str) -> torch.Tensor:
        """One response vector per sample from a tapped module's output."""
        if isinstance(output, (tuple, list)) and output:
            output = output[0 if self._hf else -1]
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise DNRTError(f"ARR: layer {name!r} gave no [B, ...] tensor to take responses from")
        how = self.reduce
        if how == "auto":
            how = _auto_reduction(self._model[0], output, self._hf_cls)
            if name not in self.chosen and not torch.compiler.is_compiling():
                if how not in self.chosen.values():
                    logger.info("ARR(%s): reduce='auto' takes %s from %s", type(self._model[0]).__name__,
                                _HOW[how], name)
                self.chosen[name] = how
        if output.dim() == 2:
            return output
        if how == "cls":
            return output[:, 0].contiguous()
        if how == "mean" and output.dim() == 3:
            return output.mean(dim=1)
        if output.shape[1] != width_hint and output.shape[-1] == width_hint:
            return output.flatten(1, -2).mean(dim=1)
        return output.flatten(2).mean(dim=2)

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """``weight · (1/J) Σ_j mean|r_j − μ_j|`` for the responses of one forward pass (see the class doc)."""
        training = self._training()
        responses = self._take(training)
        if targets.dim() != 1 or targets.shape[0] != responses[0].shape[0]:
            raise DNRTError(f"ARR.loss() expects targets of shape [batch], got {tuple(targets.shape)}")
        r = torch.cat([t.float() for t in responses], dim=1)
        self._fit_memory(r)
        distance = (r - self.memory.means(r, targets, update=training)).abs()
        if not distance.numel():
            return self.weight * distance.sum()  # an empty batch: zero, where a mean over nothing is NaN
        widths = [t.shape[1] for t in responses]
        per_layer = [part.mean() for part in distance.split(widths, dim=1)]
        return self.weight * _layer_mean(per_layer, widths, self.layer_weighting)

    def _fit_memory(self, r: torch.Tensor) -> None:
        """Make the memory on the first loss where the widths were unknown, or fix a guess no loss has used yet;
        move it to the responses' device. Outside ``torch.compile``, which cannot create or move modules."""
        memory = self.memory
        if memory is not None and memory.num_features == r.shape[1] and memory.mean.device == r.device:
            return
        if torch.compiler.is_compiling():
            raise DNRTError(f"ARR: the memory must exist on {r.device} with {r.shape[1]} features before "
                            "torch.compile; run one step without it first, or move ARR with arr.to(device)")
        if memory is None or (memory.num_features != r.shape[1] and not memory.count.any()):
            memory = self.make_memory(r.shape[1])
        if memory.num_features != r.shape[1]:
            raise DNRTError(f"ARR: the tapped layers give {r.shape[1]} response features, but the memory holds "
                            f"{memory.num_features} (a state of another model or other layers?)")
        memory.to(r.device)

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        chosen = sorted(set(self.chosen.values()))
        how = f" ({'/'.join(chosen)})" if self.reduce == "auto" and chosen else ""
        return (f"layers={len(self.layers)}, reduce={self.reduce!r}{how}, weight={self.weight}, "
                f"layer_weighting={self.layer_weighting!r}")


class _Tap:
    """ARR's forward hook on one tapped module: a plain object (no closure), so a model holding it pickles.
    A copy of it (a copy or pickle of the model) is inert: a copy of the model never feeds this ARR."""

    def __init__(self, arr: Optional[ARR], name: str, width_hint: Optional[int]) -> None:
        self.arr, self.name, self.width_hint = arr, name, width_hint

    def __call__(self, module: nn.Module, args, output) -> None:
        if self.arr is not None:
            self.arr._record(self.name, self.width_hint, output)

    def __reduce__(self):
        return _Tap, (None, self.name, self.width_hint)


def _layer_mean(losses: List[torch.Tensor], widths: List[int], weighting: str) -> torch.Tensor:
    """The per-layer losses averaged over the layers (``"paper"``), or over the layers of each width and then over
    the widths (``"reference"``, the authors' code, whose memory groups responses by width): docs/method.md §3."""
    if weighting == "paper":
        return torch.stack(losses).mean()
    groups: Dict[int, List[torch.Tensor]] = {}
    for loss, width in zip(losses, widths):
        groups.setdefault(width, []).append(loss)
    return torch.stack([torch.stack(group).mean() for group in groups.values()]).mean()


def _make_memory_for_state(arr: "ARR", state_dict, prefix: str, *args) -> None:
    """Before loading a state that holds a memory, give this ARR a memory of its shape (where it has none or
    another); a memory of another width than the model's responses is refused at the next loss."""
    mean = state_dict.get(prefix + "memory.mean")
    if mean is not None and mean.dim() == 2 and (arr.memory is None or arr.memory.mean.shape != mean.shape):
        device = mean.device if arr.memory is None else arr.memory.mean.device
        arr.make_memory(mean.shape[1]).to(device)


_HOW = {"cls": "the class token (token 0)", "mean": "the token mean", "pool": "the map's average pool"}


def _hf_config(model: nn.Module):
    """The config of a Hugging Face model (duck-typed: dnrt does not import transformers), else None."""
    config = getattr(model, "config", None)
    return config if isinstance(getattr(model, "base_model_prefix", None), str) and hasattr(
        config, "model_type") else None


def _hf_class_token(model: nn.Module) -> Optional[bool]:
    """Whether a Hugging Face model's sequences start with a class token (its model type, or a ``cls_token``
    parameter in its embeddings); None for other models."""
    config = _hf_config(model)
    if config is None:
        return None
    return config.model_type in HF_CLASS_TOKEN_TYPES or any(
        name.endswith("cls_token") for name, _ in model.named_parameters())


def _auto_reduction(model: nn.Module, output: torch.Tensor, hf_class_token: Optional[bool] = None) -> str:
    """Class token where the sequence holds one, token mean for other sequences, average pool for maps."""
    if output.dim() != 3:
        return "pool"
    if hf_class_token is not None:
        return "cls" if hf_class_token else "mean"
    prefix = getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    tokens = output.shape[1]
    has_cls = prefix > 0 and (patches is None or tokens == patches + prefix or tokens == 1)
    return "cls" if has_cls else "mean"


def _width_hint(model: nn.Module, name: str) -> Optional[int]:
    """Likely width of module ``name``'s output (the last weight registered up to its end), used only to
    tell a channels-last map (Swin's NHWC stages) from a channels-first one."""
    width, inside = None, False
    for sub_name, sub in model.named_modules():
        if inside and not sub_name.startswith(name + "."):
            break
        inside = inside or sub_name == name
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            width = weight.shape[0]
    return width


def find_layers(model: nn.Module) -> List[str]:
    """The blocks of a ViT-like model or the stages of a CNN, by the first rule that finds any.

    1. timm's ``feature_info``; 2. top-level children named ``layerN`` / ``stageN`` (torchvision ResNet,
    ShuffleNet); 3. the children of a top-level ``blocks`` container; 4. the stage ends of a top-level
    ``features`` Sequential (before each downsampling child, plus the last); 5. for a Hugging Face model, the
    children of the first non-empty ModuleList of its base model (``vit.layers``, ``bert.encoder.layer``,
    ``convnext.encoder.stages``, ``transformer.h``).
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict) and "module" in info[0]:
        return [entry["module"] for entry in info]
    children = dict(model.named_children())
    staged = [name for name in children if re.fullmatch(r"(layer|stage)\d+", name)]
    if staged:
        return staged
    blocks = children.get("blocks")
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        return [f"blocks.{i}" for i in range(len(blocks))]
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features):
        return [f"features.{i}" for i in _stage_ends(features)]
    if _hf_config(model) is not None:
        prefix = model.base_model_prefix
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) and (name.startswith(prefix + ".") or not prefix):
                return [f"{name}.{i}" for i in range(len(module))]
    raise DNRTError(
        f"ARR could not find blocks or stages in {type(model).__name__}; pass layers=[module names]"
    )


def _downsamples(module: nn.Module) -> bool:
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return True
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


def _stage_ends(features: nn.Sequential) -> List[int]:
    """Index of each pooling child, of each child before a strided one, and of the last child."""
    ends = []
    for i, child in enumerate(features):
        if isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
            ends.append(i)
        elif i > 0 and _downsamples(child) and (i - 1) not in ends and _has_weights(features[i - 1]):
            ends.append(i - 1)
    last = len(features) - 1
    if last not in ends:
        ends.append(last)
    return ends


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
