"""DNRT on Hugging Face transformers models: saving and loading converted models, ARR in the ``Trainer``,
``hidden_act="raa"``. Imports transformers (``pip install dnrt[hf]``); ``import dnrt`` does not import this module.

``dnrt.convert`` itself knows transformers' activation classes and, on a ``PreTrainedModel``, records what it
replaced under ``config.dnrt``, so ``model.save_pretrained(path)`` keeps it; ``from_pretrained(cls, path)``
rebuilds the model with those replacements before its weights load. ARR's memory is saved beside the model as
``arr_state.safetensors`` (``save_arr``, ``load_arr``; ``DNRTTrainer`` does both in its checkpoints).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DNRTError
from ..nn.arr import ARR
from ..nn.convert import ConversionReport, rebuild
from ..nn.raa import LazyRAA, RAA

CONFIG_KEY = "dnrt"
ARR_FILE = "arr_state.safetensors"


def record_conversion(model: transformers.PreTrainedModel, report: ConversionReport) -> None:
    """Add what ``convert`` replaced to ``model.config.dnrt`` (saved in config.json by ``save_pretrained``)."""
    entry = dict(getattr(model.config, CONFIG_KEY, None) or {})
    entry["modules"] = list(entry.get("modules", [])) + [dict(m) for m in report.modules]
    setattr(model.config, CONFIG_KEY, entry)


def from_pretrained(cls: Any, path: Union[str, os.PathLike], **kwargs: Any) -> transformers.PreTrainedModel:
    """``cls.from_pretrained(path, **kwargs)`` (a model class or an ``AutoModelFor...``) that gives back a converted
    model as it was saved: the replacements recorded in its config's ``dnrt`` entry are made as the model is built,
    so transformers' own loader fills them. A replacement's tensor missing from the weights is an error (it would
    start untrained); a checkpoint without the entry loads as ``cls.from_pretrained`` does."""
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    entry = getattr(config, CONFIG_KEY, None) or {"modules": []}
    lazy = _names_raa(config)
    if lazy:
        register()
    if not entry["modules"] and not lazy:
        return cls.from_pretrained(path, config=config, **kwargs)
    concrete = _model_class(cls, config)
    saved = _saved_raa(path) if lazy else {}
    converted = type(concrete.__name__, (concrete,), {"__init__": _converting_init(concrete, entry["modules"], saved),
                                                       "__module__": concrete.__module__})
    model, info = converted.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    model.__class__ = concrete  # the subclass only built it: the model is of the class the user named
    prefixes = tuple(f"{name}." for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, RAA))
    missing = sorted(k for k in info.get("missing_keys", []) if k.startswith(prefixes))
    if missing:
        raise DNRTError(f"{path}: the weights lack {len(missing)} tensors of the RAA modules its config records "
                        f"({', '.join(missing[:3])})")
    return model


def _model_class(cls: Any, config: transformers.PretrainedConfig) -> type:
    """The concrete model class: ``cls`` itself, or the one an ``AutoModel...`` class picks for ``config``."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, mapping)


def _converting_init(concrete: type, modules: List[Dict[str, Any]], saved: Dict[str, Tuple[int, int]]):
    def __init__(self, config, *args, **kwargs):
        concrete.__init__(self, config, *args, **kwargs)
        rebuild(self, modules)
        _size_lazy(self, saved)
    return __init__


def _names_raa(config: transformers.PretrainedConfig) -> bool:
    """Whether a config's activation is one ``register`` adds (the model then holds LazyRAA modules)."""
    return any(getattr(config, key, None) in ACT_NAMES for key in ("hidden_act", "hidden_activation", "activation"))


def _saved_raa(path: Union[str, os.PathLike]) -> Dict[str, Tuple[int, int]]:
    """{saved RAA module name: (width, channel_dim)} from a checkpoint's safetensors file(s): what LazyRAA
    modules need before transformers' loader (which sets tensors without ``load_state_dict``) can fill them."""
    from transformers.utils import cached_file

    index = cached_file(str(path), "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    files = ({cached_file(str(path), f) for f in json.loads(Path(index).read_text())["weight_map"].values()}
             if index else {cached_file(str(path), "model.safetensors")})
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith(".kind") and key[:-5] + ".bias" in f.keys():
                    kind = f.get_tensor(key)
                    weight = key[:-5] + ".weight"
                    width = f.get_slice(weight).get_shape()[0] if weight in f.keys() else 1
                    found[key[:-5]] = (int(width), int(kind[2]))
    return found


def _size_lazy(model: nn.Module, saved: Dict[str, Tuple[int, int]]) -> None:
    """Give each LazyRAA the width and layout its saved state has (by name, or by the name's last part where
    transformers renames keys on saving, if all such states agree)."""
    for name, module in model.named_modules():
        if not isinstance(module, LazyRAA) or not module.has_uninitialized_params():
            continue
        leaf = "." + name.rsplit(".", 1)[-1]
        sizes = {saved[name]} if name in saved else {v for k, v in saved.items() if k.endswith(leaf)}
        if len(sizes) != 1:
            raise DNRTError(f"cannot tell the width of {name} (hidden_act RAA) from the checkpoint: "
                            f"{'no saved state' if not sizes else f'saved states of several widths {sorted(sizes)}'}")
        module._materialize(*sizes.pop())


def save_pretrained(model: transformers.PreTrainedModel, path: Union[str, os.PathLike], arr: Optional[ARR] = None,
                    **kwargs: Any) -> None:
    """``model.save_pretrained(path, **kwargs)``, and ARR's memory and options beside it (``save_arr``)."""
    model.save_pretrained(path, **kwargs)
    if arr is not None:
        save_arr(arr, path)


def save_arr(arr: ARR, folder: Union[str, os.PathLike]) -> Path:
    """ARR's memory as ``folder/arr_state.safetensors``, its options in the file's metadata; written atomically."""
    if arr.memory is None:
        raise DNRTError("save_arr: this ARR has no memory yet (run one training step, or load one)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = {"num_classes": arr.num_classes, "layers": arr.layers, "reduce": arr.reduce, "weight": arr.weight,
               **arr._memory_options}
    state = {k: v.detach().cpu().contiguous() for k, v in arr.state_dict().items()}
    tmp = folder / f".{ARR_FILE}.tmp"
    save_file(state, str(tmp), metadata={"dnrt_arr": json.dumps(options)})
    os.replace(tmp, folder / ARR_FILE)
    return folder / ARR_FILE


def load_arr(target: Union[ARR, nn.Module], folder: Union[str, os.PathLike]) -> ARR:
    """Load ``folder/arr_state.safetensors`` into an ARR, or, given the model, build its ARR with the saved options
    first; returns the ARR. A folder without the file is an error (a memory silently starting afresh is not)."""
    file = Path(folder) / ARR_FILE
    if not file.is_file():
        raise DNRTError(f"no ARR memory in {folder} ({ARR_FILE} missing)")
    if isinstance(target, ARR):
        arr = target
    else:
        with safe_open(str(file), framework="pt") as f:
            options = json.loads((f.metadata() or {}).get("dnrt_arr", "{}"))
        if not options:
            raise DNRTError(f"{file} does not hold ARR's options; build dnrt.ARR yourself and pass it to load_arr")
        arr = ARR(target, **options)
    arr.load_state_dict(load_file(str(file)))
    return arr


class DNRTTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that adds ``arr.loss(labels)`` to the model's loss, saves ARR's memory in every
    checkpoint (and ``save_model``) as ``arr_state.safetensors``, and restores it on ``resume_from_checkpoint``.

    Build ``arr = dnrt.ARR(model, num_classes)`` on the converted model before the Trainer; every training batch
    needs ``labels``."""

    def __init__(self, *args: Any, arr: ARR, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arr = arr

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None, **kwargs: Any):
        labels = inputs.get("labels")
        if num_items_in_batch is not None:  # transformers < 4.46 has no such argument
            kwargs["num_items_in_batch"] = num_items_in_batch
        if labels is None:
            if model.training:
                raise DNRTError("DNRTTrainer: a training batch without 'labels'; ARR needs each sample's class")
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        arr_loss = self.arr.loss(labels)
        if model.training and self._loss_scaled_for_accumulation(num_items_in_batch):
            arr_loss = arr_loss / getattr(self, "current_gradient_accumulation_steps",
                                          self.args.gradient_accumulation_steps)
        loss = loss + arr_loss
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (ARR's is a per-batch mean)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and self.arr.memory is not None:
            save_arr(self.arr, output_dir or self.args.output_dir)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, **kwargs: Any):
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise DNRTError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}")
            load_arr(self.arr, folder)
            self._load_weights(folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_weights(self, folder: Union[str, os.PathLike]) -> None:
        """The checkpoint's model weights, read through ``from_pretrained``: transformers 5 saves some models' keys
        renamed (ViT's ``vit.layers`` as ``vit.encoder.layer``) and its Trainer's resume loads them without the
        renaming, silently keeping the fresh weights; the Trainer's own load that follows leaves these in place."""
        model = self.model
        if isinstance(model, transformers.PreTrainedModel):
            model.load_state_dict(from_pretrained(type(model), folder).state_dict())


ACT_NAMES = {"raa": {}, "raa_relu": {"base": "relu"}}


def register() -> None:
    """Make ``hidden_act="raa"`` (and ``"raa_relu"``) name ``dnrt.LazyRAA`` in transformers' activation tables
    (``ACT2CLS``, ``ACT2FN``), so a config can build a model with RAA; call it before building or loading one.

    A LazyRAA takes its width from its first input: run one forward (or load a state) before creating the
    optimizer. It finds feature vectors last in tokens and along dim 1 in 4-d maps: a model applying its
    activation to channels-last maps (Hugging Face ConvNeXt) needs ``dnrt.convert`` instead."""
    from transformers import activations
    for name, options in ACT_NAMES.items():
        entry = (LazyRAA, options) if options else LazyRAA
        activations.ACT2CLS[name] = entry
        if activations.ACT2FN is not activations.ACT2CLS:
            activations.ACT2FN[name] = entry
