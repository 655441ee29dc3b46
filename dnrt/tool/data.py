"""Datasets by name: torchvision's, image folders, scikit-learn's digits, synthetic data, and long-tailed splits.

Image folders (docs/models-data.md) take their classes by name from train/ (val/ uses the same indices) and
every file of an extension Pillow reads; other files are named at start, an undecodable image stops the run.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFile
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T

from dnrt.errors import DNRTError

DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one dataset and what it holds."""

    build: Callable[[dict, bool, Callable | None], Dataset]
    num_classes: int | None  # None: counted from the folders
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # the paper's recipe by default (no_aug=None)


def _torchvision(cls: type, root_name: str, split_kw: Callable[[bool], dict]) -> Callable:
    """A builder for a torchvision dataset that turns a failed download into one clear DNRTError."""

    def build(cfg: dict, train: bool, transform: Callable | None) -> Dataset:
        root = data_root(cfg)
        kwargs = dict(root=str(root), transform=transform, **split_kw(train))
        try:
            return cls(download=False, **kwargs)
        except RuntimeError:
            pass  # not in place: try to download it
        try:
            return _download(cls, kwargs)
        except Exception:
            raise DNRTError(f"dataset {root_name} is not in {root} and could not be downloaded; "
                            f"put {_archives(cls)} into {_archive_folder(cls, root)}") from None

    return build


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's package dataset-fashion-mnist
_ANNOUNCED: set[str] = set()  # sources already named in this process (one line, not one per split)


def _announce(line: str) -> None:
    """Print which copy of a dataset is used, once per process (the main one under torchrun)."""
    from dnrt.tool.distributed import is_main_process

    if line not in _ANNOUNCED and is_main_process():
        _ANNOUNCED.add(line)
        print(line, flush=True)


def read_idx(path: Path) -> torch.Tensor:
    """A uint8 tensor from a gzipped idx file (the MNIST family's format: magic 0x0000080N, N big-endian sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= ndim <= 3:
        raise DNRTError(f"{path} is not a uint8 idx file (magic {magic:#010x})")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 * (ndim + 1):]
    if len(body) != math.prod(shape):
        raise DNRTError(f"{path} holds {len(body)} bytes of data, its header says {shape}; the file is damaged")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


class GzipFashionMNIST(torchvision.datasets.FashionMNIST):
    """torchvision's FashionMNIST read from the gzipped idx files of one folder, where they are left in place
    (Debian's dataset-fashion-mnist installs them so; torchvision itself reads only the unpacked files)."""

    def __init__(self, folder: Path, train: bool, transform: Callable | None = None) -> None:
        self.folder = Path(folder)
        super().__init__(str(folder), train=train, transform=transform)

    @property
    def raw_folder(self) -> str:
        return str(self.folder)

    def _check_exists(self) -> bool:
        return all((self.folder / name).is_file() for name, _ in self.resources)

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if self.train else "t10k"
        images, labels = (read_idx(self.folder / f"{split}-{kind}.gz") for kind in ("images-idx3-ubyte",
                                                                                     "labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DNRTError(f"{self.folder}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                            f"do not match")
        return images, labels.long()


def _fashion_mnist(cfg: dict, train: bool, transform: Callable | None) -> Dataset:
    """Fashion-MNIST from data_root's copy (torchvision's layout), else Debian's files in place, else
    torchvision's download; one line says which."""
    root, cls = data_root(cfg), torchvision.datasets.FashionMNIST
    try:
        dataset = cls(str(root), train=train, transform=transform, download=False)
        _announce(f"fashion_mnist: data_root's copy in {_archive_folder(cls, root)}")
        return dataset
    except RuntimeError:
        pass  # no copy in data_root
    if all((DEBIAN_FASHION_MNIST / name).is_file() for name, _ in cls.resources):
        dataset = GzipFashionMNIST(DEBIAN_FASHION_MNIST, train, transform)
        _announce(f"fashion_mnist: Debian's dataset-fashion-mnist files in {DEBIAN_FASHION_MNIST} "
                  f"(none in data_root {root})")
        return dataset
    try:
        dataset = _download(cls, dict(root=str(root), train=train, transform=transform))
    except Exception:
        raise DNRTError(f"dataset fashion_mnist: found neither in {_archive_folder(cls, root)} ({_archives(cls)}) "
                        f"nor in {DEBIAN_FASHION_MNIST} (Debian: apt install dataset-fashion-mnist), "
                        f"and the download failed") from None
    _announce(f"fashion_mnist: downloaded by torchvision into {_archive_folder(cls, root)}")
    return dataset


def _download(cls: type, kwargs: dict) -> Dataset:
    """cls(download=True) with a socket timeout (torchvision sets none: a dropped connection would hang)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(download=True, **kwargs)
    finally:
        socket.setdefaulttimeout(previous)


def data_root(cfg: dict) -> Path:
    """cfg['data_root'] as a path; one that is a file is a DNRTError."""
    root = Path(cfg["data_root"]).expanduser()
    if root.exists() and not root.is_dir():
        raise DNRTError(f"data_root {root} is a file, not a folder; give the folder that holds the dataset")
    return root


class UnreadableImage(DNRTError):
    """An image file that cannot be decoded. The run stops naming it (a silently skipped image would change the
    data set). DataLoader rebuilds a worker's exception from the worker's whole traceback: keep our one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message.strip().splitlines()[-1].rpartition(f"{type(self).__name__}: ")[2])


def read_image(path: str) -> Image.Image:
    """ImageFolder's loader, naming the file when it cannot be read or decoded (truncated, not an image)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for damaged files
        raise UnreadableImage(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove the file") \
            from None


def _archives(cls: type) -> str:
    """The file names torchvision looks for, for the message of a missing dataset."""
    if hasattr(cls, "filename"):  # CIFAR
        return cls.filename
    if hasattr(cls, "split_list"):  # SVHN
        return " and ".join(cls.split_list[split][1] for split in ("train", "test"))
    return ", ".join(name for name, _ in cls.resources)  # MNIST family


def _archive_folder(cls: type, root: Path) -> Path:
    return root / cls.__name__ / "raw" if hasattr(cls, "resources") else root


@functools.lru_cache(maxsize=None)
def image_extensions() -> frozenset[str]:
    """The file extensions of every format Pillow reads (lower case, with the dot): `.gif`, `.tif`, `.webp`, ...,
    where torchvision's ImageFolder takes only its IMG_EXTENSIONS; not Pillow's identify-only stubs (`.h5`, ...)."""
    extensions = Image.registered_extensions()  # loads every plugin first
    stubs = {fmt for fmt, (factory, _) in Image.OPEN.items()
             if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    return frozenset(ext for ext, fmt in extensions.items() if fmt in Image.OPEN and fmt not in stubs)


class _ByExtension:
    """ImageFolder's is_valid_file: a file of an extension Pillow opens; remembers the files it turns down."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def __call__(self, path: str) -> bool:
        if os.path.splitext(path)[1].lower() in image_extensions():
            return True
        self.refused.append(path)
        return False


def folder_classes(root: Path, name: str = "folder") -> list[str]:
    """The classes of a folder dataset: the class folders of root/train, sorted by name (as torchvision sorts);
    val/ takes the same names and indices."""
    train = root / "train"
    if not train.is_dir():
        raise DNRTError(f"dataset {name}: {train} not found; the classes and their indices come from it; "
                        f"expected {train}/<class>/<image> and {root / 'val'}/<class>/<image>")
    classes = _class_folders(train)
    if not classes:
        raise DNRTError(f"dataset {name}: {train} holds no class folders; expected {train}/<class>/<image>")
    expected = _spec(name)[0].num_classes
    if expected is not None and len(classes) != expected:
        raise DNRTError(f"dataset {name}: {train} holds {len(classes)} class folders, not {expected}")
    return classes


def _class_folders(folder: Path) -> list[str]:
    """The names of the folders in `folder`, sorted (torchvision's find_classes, without its error when none)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


class _ClassFolder(torchvision.datasets.ImageFolder):
    """ImageFolder over the given classes (train/'s, in its order), taking every file of an extension Pillow opens."""

    def __init__(self, folder: Path, classes: list[str], transform: Callable | None, valid: _ByExtension,
                 allow_empty: bool) -> None:
        self._classes = classes
        super().__init__(str(folder), transform=transform, loader=read_image, is_valid_file=valid,
                         allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._classes), {name: i for i, name in enumerate(self._classes)}


def _image_folder(cfg: dict, train: bool, transform: Callable | None) -> Dataset:
    """An ImageFolder under data_root/train or data_root/val (one folder per class), classes by name from train/."""
    root = data_root(cfg)
    folder = root / ("train" if train else "val")
    name = cfg["dataset"]
    if not folder.is_dir():
        raise DNRTError(f"dataset {name}: folder {folder} not found; expected "
                        f"{Path(cfg['data_root']) / 'train'}/<class>/<image> and "
                        f"{Path(cfg['data_root']) / 'val'}/<class>/<image>")
    classes = folder_classes(root, name)
    if not train:
        unknown = sorted(set(_class_folders(folder)) - set(classes))
        if unknown:
            raise DNRTError(f"dataset {name}: {folder} has {len(unknown)} class folder(s) that {root / 'train'} lacks "
                            f"({_some(unknown)}); the classes and their indices come from train/")
    valid = _ByExtension()
    try:
        dataset = _ClassFolder(folder, classes, transform, valid, allow_empty=not train)
    except (FileNotFoundError, RuntimeError) as e:
        raise DNRTError(f"dataset {name}: {e}") from None
    if not len(dataset):
        raise DNRTError(f"dataset {name}: {folder} holds no images of the classes of train/")
    unused = sorted(str(Path(p).relative_to(folder)) for p in valid.refused) + \
        sorted(p.name for p in folder.iterdir() if not p.is_dir())
    if unused:
        _note(f"dataset {name}: {len(unused)} file(s) in {folder} not used, outside a class folder or not of an "
              f"image extension Pillow opens: {_some(unused)}")
    if not train:
        present = set(dataset.targets)
        absent = [c for i, c in enumerate(classes) if i not in present]
        if absent:
            _note(f"dataset {name}: {folder} has no images of {len(absent)} of the {len(classes)} classes of "
                  f"train/ ({_some(absent)}); the others keep their train/ indices")
    return dataset


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first few names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _note(message: str) -> None:
    from dnrt.tool.distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _digits(cfg: dict, train: bool, transform: Callable | None) -> Dataset:
    """scikit-learn's bundled 8x8 digits in [0, 1], split half/half stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
    x, y = (x_train, y_train) if train else (x_test, y_test)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    images = _resize(images, cfg["image_size"] or 8)
    return TensorDataset(images, torch.tensor(y, dtype=torch.long))


def _fake(cfg: dict, train: bool, transform: Callable | None) -> Dataset:
    """Synthetic, learnable data for tests: a fixed random pattern per class plus noise (10 classes, 3 channels)."""
    size = cfg["image_size"] or 32
    gen = torch.Generator().manual_seed(cfg["seed"])
    patterns = torch.randn(10, 3, size, size, generator=gen)
    n = 256 if train else 128
    gen.manual_seed(cfg["seed"] + (1 if train else 2))
    targets = torch.arange(n) % 10
    images = patterns[targets] + 1.5 * torch.randn(n, 3, size, size, generator=gen)
    return TensorDataset(images, targets)


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
RAW = ((0.0,), (1.0,))  # digits and fake are tensors already, used as they are



def _split(train: bool) -> dict:
    return {"train": train}


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(_torchvision(torchvision.datasets.CIFAR10, "cifar10", _split), 10, 3, 32,
                           *CIFAR10_STATS, True),
    "cifar100": DatasetSpec(_torchvision(torchvision.datasets.CIFAR100, "cifar100", _split), 100, 3, 32,
                            *CIFAR100_STATS, True),
    "mnist": DatasetSpec(_torchvision(torchvision.datasets.MNIST, "mnist", _split), 10, 1, 28, *MNIST_STATS, False),
    "fashion_mnist": DatasetSpec(_fashion_mnist, 10, 1, 28, *FASHION_STATS, False),
    "svhn": DatasetSpec(_torchvision(torchvision.datasets.SVHN, "svhn", lambda t: {"split": "train" if t else "test"}),
                        10, 3, 32, *SVHN_STATS, True),
    "imagenet100": DatasetSpec(_image_folder, 100, 3, 224, *IMAGENET_STATS, True),
    "imagenet1k": DatasetSpec(_image_folder, 1000, 3, 224, *IMAGENET_STATS, True),
    "folder": DatasetSpec(_image_folder, None, 3, 224, *IMAGENET_STATS, True),
    "digits": DatasetSpec(_digits, 10, 1, 8, *RAW, False),
    "fake": DatasetSpec(_fake, 10, 3, 32, *RAW, False),
}


def _spec(name: str) -> tuple[DatasetSpec, bool]:
    """The spec of a dataset name and whether it is the long-tailed (`_lt`) variant."""
    long_tailed = name.endswith("_lt") and name[:-3] in DATASETS
    base = name[:-3] if long_tailed else name
    if base not in DATASETS:
        known = ", ".join(list(DATASETS) + ["<name>_lt"])
        raise DNRTError(f"unknown dataset '{name}'; known: {known}")
    return DATASETS[base], long_tailed


def dataset_info(cfg: dict) -> dict[str, int]:
    """num_classes, in_chans and img_size the model needs for this dataset (image_size overrides the size)."""
    spec, _ = _spec(cfg["dataset"])
    num_classes = spec.num_classes
    if num_classes is None:
        num_classes = len(folder_classes(data_root(cfg), cfg["dataset"]))
    return dict(num_classes=num_classes, in_chans=spec.in_chans, img_size=cfg["image_size"] or spec.img_size)


def build_transform(cfg: dict, train: bool) -> Callable:
    """timm's create_transform with the paper's recipe for training (docs/method.md §5), or tensor + normalise
    when no_aug."""
    spec, _ = _spec(cfg["dataset"])
    size = cfg["image_size"] or spec.img_size
    no_aug = (not spec.augment) if cfg["no_aug"] is None else cfg["no_aug"]
    if no_aug:
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    if train:
        recipe = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                      interpolation="random", re_prob=0.25, re_mode="pixel", re_count=1)
        kwargs = {**recipe, **cfg["train_aug_kwargs"]}
    else:
        kwargs = {"crop_pct": 0.875, "interpolation": "bicubic", **cfg["eval_aug_kwargs"]}
    return _zero_bit_posterize(create_transform(size, is_training=train, mean=spec.mean, std=spec.std, **kwargs))


def _zero_bit_posterize(transform: Callable) -> Callable:
    """Pillow ≥ 13 rejects posterizing to 0 bits, which timm's RandAugment asks for at magnitude 10 (about one
    image in 300 with the paper's recipe, so a run fails in its first epoch); give the black image that
    earlier Pillow returned."""
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    return img.point(lambda _: 0) if bits_to_keep <= 0 else auto_augment.posterize(img, bits_to_keep, **kwargs)


def location(dataset: Dataset, cfg: dict) -> str:
    """Where a built dataset was read from: its own root (torchvision's datasets, e.g. Debian's Fashion-MNIST
    folder), else data_root."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return str(getattr(dataset, "root", cfg["data_root"]))


def targets_of(dataset: Dataset) -> list[int]:
    """The class index of every sample, read from the dataset's label field without loading images."""
    for field in ("targets", "labels"):
        if hasattr(dataset, field):
            return [int(t) for t in getattr(dataset, field)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    raise DNRTError(f"cannot read the labels of {type(dataset).__name__} to make a long-tailed split")


def long_tailed_indices(targets: Sequence[int], imbalance_factor: float) -> list[int]:
    """Indices of a long-tailed subset: class i of K keeps floor(n_max * β^(-i/(K-1))) samples, in dataset order."""
    targets = np.asarray(targets)
    classes = np.unique(targets)
    n_max = max(int((targets == c).sum()) for c in classes)
    keep: list[int] = []
    for i, c in enumerate(classes):
        n_i = math.floor(n_max * imbalance_factor ** (-i / max(len(classes) - 1, 1)))
        keep.extend(np.flatnonzero(targets == c)[:n_i].tolist())
    return sorted(keep)


def balanced_indices(targets: Sequence[int], n: int) -> list[int]:
    """Indices of the first n // K samples of each of the K classes, in dataset order."""
    targets = np.asarray(targets)
    classes = np.unique(targets)
    per_class = n // len(classes)
    if per_class < 1:
        raise DNRTError(f"train_subset={n} is fewer than one image for each of the {len(classes)} classes")
    return sorted(i for c in classes for i in np.flatnonzero(targets == c)[:per_class].tolist())


def build_dataset(cfg: dict, train: bool) -> Dataset:
    """The training or test set named by cfg['dataset'], transformed; `<name>_lt` and train_subset subsample the
    training set."""
    spec, long_tailed = _spec(cfg["dataset"])
    subset = cfg.get("train_subset")
    if long_tailed and subset is not None:
        raise DNRTError(f"train_subset={subset} with the long-tailed {cfg['dataset']}: choose one of the two")
    dataset = spec.build(cfg, train, build_transform(cfg, train))
    if long_tailed and train:
        if cfg["imbalance_factor"] < 1:
            raise DNRTError(f"imbalance_factor must be >= 1, got {cfg['imbalance_factor']}")
        dataset = Subset(dataset, long_tailed_indices(targets_of(dataset), cfg["imbalance_factor"]))
    if subset is not None and train:
        dataset = Subset(dataset, balanced_indices(targets_of(dataset), subset))
    return dataset
