"""Models by name, built from timm and torchvision (adapted for 32x32 input where needed), then dnrt.convert."""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from dnrt.errors import DNRTError


def _timm(name: str, **fixed: Any) -> Callable[..., nn.Module]:
    """A builder for a timm architecture with some constructor arguments fixed (e.g. patch 4 for 32x32)."""

    def build(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
        args = {"img_size": img_size, **fixed, **kwargs}
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **args)

    return build


def _pvt_v2_b0(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """timm has PVT v2 only: pvt_v2_b0 (3.4 M parameters) stands in for PVT-Tiny. Fully convolutional: no img_size."""
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if img_size <= 64:  # stride 2 instead of 4 in the first patch embedding: 16x16 tokens for 32x32 input
        model.patch_embed.proj.stride = (2, 2)
    return model


def _small_input(img_size: int) -> bool:
    return img_size <= 64


def _first_conv(conv: nn.Conv2d, in_chans: int, **changes: Any) -> nn.Conv2d:
    """A fresh copy of `conv` with other input channels, kernel, stride or padding."""
    args = dict(in_channels=in_chans, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
    return nn.Conv2d(**{**args, **changes})


def _alexnet(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision AlexNet; for small input the 11x11/4 stem becomes 3x3/2 so the three max-pools still fit."""
    model = torchvision.models.alexnet(num_classes=num_classes, **kwargs)
    small = dict(kernel_size=3, stride=2, padding=1) if _small_input(img_size) else {}
    model.features[0] = _first_conv(model.features[0], in_chans, **small)
    return model


def _vgg11(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision VGG-11 unchanged: 32x32 input ends at 1x1, which its adaptive pool spreads to 7x7."""
    model = torchvision.models.vgg11(num_classes=num_classes, **kwargs)
    model.features[0] = _first_conv(model.features[0], in_chans)
    return model


def _resnet18(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18 with its ImageNet stem (7x7/2 conv + max-pool)."""
    model = torchvision.models.resnet18(num_classes=num_classes, **kwargs)
    model.conv1 = _first_conv(model.conv1, in_chans)
    return model


def _resnet18_cifar(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3/1 conv and no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes, **kwargs)
    model.conv1 = _first_conv(model.conv1, in_chans, kernel_size=3, stride=1, padding=1)
    model.maxpool = nn.Identity()
    return model


class ResNet32Cifar(nn.Module):
    """He et al.'s CIFAR ResNet-32 (3 stages of 5 basic blocks, 16/32/64 channels); neither torchvision nor timm has it.

    Built from torchvision's BasicBlock, with 1x1-conv shortcuts where the shape changes.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, blocks_per_stage: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        shortcut = None
        if stride != 1 or in_planes != planes:
            shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(in_planes, planes, stride=stride, downsample=shortcut)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet32_cifar(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    return ResNet32Cifar(num_classes=num_classes, in_chans=in_chans, **kwargs)


def _mobilenet_v2(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision MobileNetV2; for small input the stem conv has stride 1 (overall stride 16 instead of 32)."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, **kwargs)
    stem = model.features[0][0]
    model.features[0][0] = _first_conv(stem, in_chans, stride=1 if _small_input(img_size) else stem.stride)
    return model


def _shufflenet_v2(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """torchvision ShuffleNetV2 x1.0; for small input the stem conv has stride 1 and the max-pool is removed."""
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes, **kwargs)
    stem = model.conv1[0]
    model.conv1[0] = _first_conv(stem, in_chans, stride=1 if _small_input(img_size) else stem.stride)
    if _small_input(img_size):
        model.maxpool = nn.Identity()
    return model


class MLP(nn.Module):
    """A plain multi-layer perceptron on flattened images; `blocks` lets ARR (layers="auto") tap every hidden layer."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 256, depth: int = 3, drop: float = 0.0):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(drop))
            for a, b in zip(widths, widths[1:])
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _mlp(num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    return MLP(num_classes, in_chans * img_size * img_size, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny_patch4_32": _timm("vit_tiny_patch16_224", patch_size=4, drop_path_rate=0.1),
    "vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", drop_path_rate=0.1),
    "deit_tiny_patch4_32": _timm("deit_tiny_patch16_224", patch_size=4, drop_path_rate=0.1),
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", drop_path_rate=0.1),
    "cait_xxs_patch4_32": _timm("cait_xxs24_224", patch_size=4),
    "cait_xxs24_224": _timm("cait_xxs24_224"),
    "pvt_tiny_32": _pvt_v2_b0,
    "pvt_tiny_224": _pvt_v2_b0,
    # TNT-Small for 32x32: 4x4 patches whose 16 pixels are the inner tokens (inner conv stride 1)
    "tnt_small_patch4_32": _timm("tnt_s_patch16_224", patch_size=4, first_stride=1),
    "tnt_s_patch16_224": _timm("tnt_s_patch16_224"),
    "alexnet": _alexnet,
    "vgg11": _vgg11,
    "resnet18": _resnet18,
    "resnet18_cifar": _resnet18_cifar,
    "resnet32_cifar": _resnet32_cifar,
    "mobilenet_v2": _mobilenet_v2,
    "shufflenet_v2": _shufflenet_v2,
    "mlp": _mlp,
}

# the library model whose published weights `pretrained=True` loads into each registry model (none where neither
# library has the architecture or its stem: resnet18_cifar, resnet32_cifar, mlp)
LIBRARY_WEIGHTS: dict[str, tuple[str, str]] = {
    "vit_tiny_patch4_32": ("timm", "vit_tiny_patch16_224"), "vit_tiny_patch16_224": ("timm", "vit_tiny_patch16_224"),
    "deit_tiny_patch4_32": ("timm", "deit_tiny_patch16_224"),
    "deit_tiny_patch16_224": ("timm", "deit_tiny_patch16_224"),
    "cait_xxs_patch4_32": ("timm", "cait_xxs24_224"), "cait_xxs24_224": ("timm", "cait_xxs24_224"),
    "pvt_tiny_32": ("timm", "pvt_v2_b0"), "pvt_tiny_224": ("timm", "pvt_v2_b0"),
    "tnt_small_patch4_32": ("timm", "tnt_s_patch16_224"), "tnt_s_patch16_224": ("timm", "tnt_s_patch16_224"),
    "alexnet": ("torchvision", "alexnet"), "vgg11": ("torchvision", "vgg11"),
    "resnet18": ("torchvision", "resnet18"),
    "mobilenet_v2": ("torchvision", "mobilenet_v2"), "shufflenet_v2": ("torchvision", "shufflenet_v2_x1_0"),
}


def _from_library(lib: str, name: str, num_classes: int, in_chans: int, img_size: int, kwargs: dict) -> nn.Module:
    """Any timm or torchvision model by name, with `kwargs` passed to its constructor."""
    if lib == "timm":
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise DNRTError(f"unknown timm model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
        args = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        try:
            return timm.create_model(name, **{"img_size": img_size, **args})
        except TypeError:  # an architecture without an img_size argument (CNNs, fully convolutional models)
            return timm.create_model(name, **args)
    if lib == "torchvision":
        names = torchvision.models.list_models()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            raise DNRTError(f"unknown torchvision model '{name}'"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
        if in_chans != 3:
            raise DNRTError(f"torchvision models take 3 input channels; the dataset has {in_chans}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise DNRTError(f"unknown model_lib '{lib}'; use 'timm', 'torchvision' or None")


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 32, act: str | None = None,
                 model_lib: str | None = None, model_kwargs: dict | None = None, pretrained: bool = False,
                 pretrained_file: str | None = None) -> nn.Module:
    """Build a model by name; entries of model_kwargs override the derived sizes; `act` swaps every activation
    (model_kwargs' act_layer, the authors' way, sets it: see dnrt.compat).

    `pretrained=True` loads the library's published weights, `pretrained_file` a weights file, into the plain model
    before `act` is swapped in (see load_pretrained)."""
    from dnrt.compat import from_act_layer, set_shift

    kwargs = dict(model_kwargs or {})
    if "pretrained" in kwargs or "weights" in kwargs:
        raise DNRTError("model_kwargs: pretrained weights are set by the config keys pretrained = True (the library's "
                        "own weights) or pretrained_file = PATH, not by model_kwargs")
    act, shift = from_act_layer(kwargs.pop("act_layer", None), act)
    num_classes = kwargs.pop("num_classes", num_classes)
    in_chans = kwargs.pop("in_chans", in_chans)
    img_size = kwargs.pop("img_size", img_size)
    if model_lib is not None:
        model = _from_library(model_lib, name, num_classes, in_chans, img_size, kwargs)
    elif name in MODELS:
        try:
            model = MODELS[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
        except TypeError as e:
            raise DNRTError(f"model {name}: bad model_kwargs ({e})") from None
    else:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DNRTError(f"unknown model '{name}'; {hint}known: {', '.join(MODELS)} "
                        f"(or set model_lib='timm'/'torchvision')")
    left: dict[str, torch.Tensor] = {}
    if pretrained_file:
        lib = model_lib or LIBRARY_WEIGHTS.get(name, ("", name))[0]
        left = load_pretrained(model, read_weights(pretrained_file), pretrained_file, timm_filter=lib == "timm")
    elif pretrained:
        lib, lib_name = _library_source(name, model_lib)
        left = load_pretrained(model, library_weights(lib, lib_name), f"{lib}'s {lib_name}", timm_filter=lib == "timm")
    if act is not None:
        from dnrt import convert

        example = torch.zeros(2, in_chans, img_size, img_size)
        model.eval()  # the dry forward of convert must not touch BatchNorm statistics
        try:
            convert(model, example, activation=act, replace="all")
        except DNRTError as e:  # nothing replaceable: the run would say act=... of a model that does not hold it
            raise DNRTError(f"model {name}: act={act!r} cannot be applied: {e}") from None
        if shift is not None:
            set_shift(model, shift)
        model.train()
    if left:
        _load_after_conversion(model, left)
    return model


def _library_source(name: str, model_lib: str | None) -> tuple[str, str]:
    """(library, model name) whose published weights `pretrained=True` means for this model."""
    if model_lib is not None:
        return model_lib, name
    if name not in LIBRARY_WEIGHTS:
        raise DNRTError(f"pretrained=True: model {name} is built here and has no published weights; "
                        f"train it once and set pretrained_file to that run's checkpoint")
    return LIBRARY_WEIGHTS[name]


def library_weights(lib: str, name: str) -> dict[str, torch.Tensor]:
    """The published weights of a timm or torchvision model (downloaded once into the library's cache)."""
    if lib == "timm":
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise DNRTError(f"pretrained=True: timm has no published weights for {name}")
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors" if cfg.hf_hub_id else cfg.url
    else:
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (KeyError, ValueError):
            raise DNRTError(f"pretrained=True: torchvision has no published weights for {name}") from None
        url = weights.url
    try:
        if lib == "timm":
            return timm.create_model(name, pretrained=True).state_dict()
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as e:  # no network, or the download failed
        raise DNRTError(f"pretrained=True: {lib} could not download the weights of {name} ({type(e).__name__}); "
                        f"fetch {url} and set pretrained_file to the downloaded file") from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a plain state_dict, a timm/torchvision training checkpoint
    ({'state_dict': ...} / {'model': ...}), a dnrt checkpoint, or a .safetensors file."""
    file = Path(path)
    if not file.is_file():
        raise DNRTError(f"pretrained_file not found: {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(file)
        else:  # timm's train.py saves its argparse.Namespace beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling a damaged or foreign file can raise almost any exception type
        from dnrt.tool.rundir import unreadable

        raise DNRTError(f"pretrained_file {path} {unreadable(e, 'a weights file')}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DNRTError(f"pretrained_file {path} holds no state_dict (a dict of tensors, or one under "
                        f"'state_dict' or 'model')")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DNRTError(f"pretrained_file {path} holds NaN or infinite values in {len(bad)} tensors "
                        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the file is damaged; training "
                        f"from it cannot work")
    return {_strip_prefixes(k): v for k, v in state.items()}


def _strip_prefixes(key: str) -> str:
    """Parameter names as the plain model has them: without DDP's `module.` and torch.compile's `_orig_mod.`."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _head_names(model: nn.Module) -> set[str]:
    """Parameter names of the classifier: timm's get_classifier(), else the model's last Linear."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    return {f"{n}.{p}".lstrip(".") for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                    timm_filter: bool = False) -> dict[str, torch.Tensor]:
    """Load `state` into the plain `model` by name; a classifier of another class count stays freshly initialised.

    Any other missing or misshapen tensor is a DNRTError. Prints one line of what was loaded and skipped; returns the
    entries the plain model lacks (e.g. RAA's parameters of a dnrt checkpoint), for loading after conversion."""
    if timm_filter:  # timm's own adaptation of published weights (e.g. ViT position embeddings resampled to img_size)
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
    own = model.state_dict()
    heads = _head_names(model)
    dropped = sorted(k for k in heads if k in state and state[k].shape != own[k].shape)
    misshapen = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model" for k, v in state.items()
                 if k in own and k not in dropped and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in heads and not k.endswith("num_batches_tracked")]
    if misshapen or missing:
        problems = misshapen[:3] + [f"{k} missing from the file" for k in missing[:3]]
        raise DNRTError(f"pretrained weights from {source} do not fit the model ({len(misshapen)} misshapen, "
                        f"{len(missing)} missing): {'; '.join(problems)}")
    loaded = {k: v for k, v in state.items() if k in own and k not in dropped}
    model.load_state_dict(loaded, strict=False)
    left = {k: v for k, v in state.items() if k not in own}
    fresh = dropped or sorted(k for k in heads if k not in state)
    why = f"{state[dropped[0]].shape[0]} classes in the file" if dropped else "not in the file"
    head = f"; classifier {', '.join(fresh)} re-initialised ({why})" if fresh else ""
    rest = f"; {len(left)} tensors not in the plain model ({', '.join(sorted(left)[:3])}" \
        f"{', ...' if len(left) > 3 else ''})" if left else ""
    _print_main(f"pretrained: loaded {len(loaded)} of the model's {len(own)} tensors from {source}{head}{rest}")
    return left


def _load_after_conversion(model: nn.Module, left: dict[str, torch.Tensor]) -> None:
    """Load the tensors the plain model lacked where the converted model has them (RAA's w and b of a DNRT run)."""
    own = model.state_dict()
    fits = {k: v for k, v in left.items() if k in own and own[k].shape == v.shape}
    if fits:
        model.load_state_dict(fits, strict=False)
        _print_main(f"pretrained: loaded {len(fits)} more tensors into the converted activations; "
                    f"{len(left) - len(fits)} skipped")


def _print_main(message: str) -> None:
    from dnrt.tool.distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def build_arr(model: nn.Module, cfg: dict, num_classes: int) -> Any:
    """dnrt.ARR on `model` when cfg['criterion'] == 'arr', else None; build it before wrapping the model in DDP."""
    if cfg["criterion"] == "ce":
        return None
    if cfg["criterion"] != "arr":
        raise DNRTError(f"unknown criterion '{cfg['criterion']}'; use 'ce' or 'arr'")
    from dnrt import ARR

    return ARR(model, num_classes, layers=cfg["arr_layers"] or "auto", momentum=cfg["arr_momentum"],
               order=cfg["arr_order"], weight=cfg["arr_loss_coef"], layer_weighting=cfg["arr_layer_weighting"])
