"""Datasets, long-tailed splits, models and checkpoints of the training tool."""
import math
from pathlib import Path

import pytest
import torch

from dnrt.errors import DNRTError
from dnrt.tool.rundir import load_checkpoint, save_checkpoint
from dnrt.tool.config import resolve
from dnrt.tool.data import build_dataset, build_transform, dataset_info, long_tailed_indices
from dnrt.tool.models import build_arr, create_model

# CIFAR-10-LT training-set sizes per class for imbalance factor 100, as published (Cao et al., LDAM, 2019)
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("beta", [10, 50, 100])
def test_long_tailed_counts(beta):
    targets = [i % 10 for i in range(50_000)]  # CIFAR-10 shape: 5000 per class, interleaved
    kept = long_tailed_indices(targets, beta)
    counts = [sum(1 for i in kept if targets[i] == c) for c in range(10)]
    assert counts == [int(5000 / beta ** (c / 9) + 1e-9) for c in range(10)]
    assert counts[0] == 5000 and counts[-1] == 5000 // beta
    if beta == 100:
        assert counts == CIFAR10_LT_100
    first_of_class_9 = [i for i in range(50_000) if targets[i] == 9][: 5000 // beta]
    assert [i for i in kept if targets[i] == 9] == first_of_class_9  # deterministic: the first ones in order


def test_long_tailed_dataset_keeps_test_set():
    cfg = resolve({"dataset": "digits_lt", "imbalance_factor": 10})
    train, test = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    labels = train.dataset.tensors[1][train.indices]
    counts = torch.bincount(labels, minlength=10).tolist()
    full = torch.bincount(build_dataset(resolve({"dataset": "digits"}), train=True).tensors[1], minlength=10)
    n_max = int(full.max())
    assert counts == [min(int(full[c]), math.floor(n_max * 10 ** (-c / 9))) for c in range(10)]
    assert len(test) == 899


def test_digits_split_and_resize():
    cfg = resolve({"dataset": "digits", "image_size": 16})
    train, test = build_dataset(cfg, True), build_dataset(cfg, False)
    assert len(train) == 898 and len(test) == 899
    x, _ = train[0]
    assert x.shape == (1, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert dataset_info(cfg) == {"num_classes": 10, "in_chans": 1, "img_size": 16}
    assert torch.bincount(train.tensors[1]).tolist() == pytest.approx(torch.bincount(test.tensors[1]).tolist(), abs=1)


def test_missing_dataset_names_archive_and_folder(tmp_path):
    cfg = resolve({"dataset": "cifar10", "data_root": str(tmp_path)})
    with pytest.raises(DNRTError, match=f"cifar-10-python.tar.gz into {tmp_path}"):
        build_dataset(cfg, train=True)


def test_unknown_dataset_and_model():
    with pytest.raises(DNRTError, match="unknown dataset 'cifar11'.*cifar10"):
        dataset_info(resolve({"dataset": "cifar11"}))
    with pytest.raises(DNRTError, match="did you mean resnet18"):
        create_model("resnet19", num_classes=10)


@pytest.mark.parametrize("name", ["resnet32_cifar", "mlp", "shufflenet_v2"])
def test_models_with_raa_and_arr(name):
    model = create_model(name, num_classes=10, in_chans=1, img_size=16, act="raa")
    assert any(type(m).__name__ == "RAA" for m in model.modules())
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.GELU)) for m in model.modules())
    arr = build_arr(model, resolve({"criterion": "arr", "arr_loss_coef": 1.0}), 10)
    logits = model(torch.randn(4, 1, 16, 16))
    assert logits.shape == (4, 10)
    assert len(arr.layers) >= 3 and arr.loss(torch.arange(4)).ndim == 0


def test_resnet18_cifar_stem():
    model = create_model("resnet18_cifar", num_classes=100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_checkpoint_round_trip_and_corrupt(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 4, "config": {"a": [1, 2]}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind
    state = load_checkpoint(path)
    assert state["epoch"] == 4 and torch.equal(state["model"]["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DNRTError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(DNRTError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_image_folder_with_the_paper_recipe(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for k, colour in enumerate(("red", "blue", "green")):
            (tmp_path / split / f"class{k}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20 + i, 12), colour).save(tmp_path / split / f"class{k}" / f"{i}.png")
    cfg = resolve({"dataset": "folder", "data_root": str(tmp_path), "image_size": 16})
    assert dataset_info(cfg) == {"num_classes": 3, "in_chans": 3, "img_size": 16}
    train, val = build_dataset(cfg, True), build_dataset(cfg, False)  # RandAugment, crop, erase / resize + crop
    assert len(train) == 6 and train.classes == ["class0", "class1", "class2"]
    assert train[0][0].shape == val[5][0].shape == (3, 16, 16) and val[5][1] == 2
    plain = build_dataset({**cfg, "no_aug": True}, False)
    assert torch.equal(plain[3][0], build_dataset({**cfg, "no_aug": True}, False)[3][0])  # deterministic


def test_paper_recipe_posterizes_to_zero_bits_without_error():
    from PIL import Image

    transform = build_transform(resolve({"dataset": "cifar10"}), train=True)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())]
    op = next(op for op in ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # level 10: keep 4 - 4 = 0 bits
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getcolors() == [(64, (0, 0, 0))]
    op.magnitude = 5  # keep 2 bits: 200 -> 192, 100 -> 64, 50 -> 0
    assert op(image).getcolors() == [(64, (192, 64, 0))]


COLOURS = {"a_red": "red", "b_green": "lime", "c_blue": "blue"}


def colour_folders(root, val_classes=tuple(COLOURS), extra=()):
    """train/ with every class of COLOURS, val/ with `val_classes` (and `extra` class folders of white images)."""
    from PIL import Image

    for split, names in (("train", COLOURS), ("val", [*val_classes, *extra])):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), COLOURS.get(name, "white")).save(root / split / name / f"{i}.png")
    return resolve({"dataset": "folder", "data_root": str(root), "image_size": 8, "no_aug": True, "num_workers": 0})


def test_val_without_a_train_class_keeps_the_train_indices(tmp_path, capsys):
    """A perfect model (the brightest channel: red, green, blue = class 0, 1, 2) scores 100 %, not 50 %."""
    from contextlib import nullcontext

    from dnrt.tool.train import evaluate, test_loader

    cfg = colour_folders(tmp_path, val_classes=("a_red", "c_blue"))
    val = build_dataset(cfg, train=False)
    assert capsys.readouterr().out == (f"dataset folder: {tmp_path / 'val'} has no images of 1 of the 3 classes of "
                                       f"train/ (b_green); the others keep their train/ indices\n")
    assert val.classes == ["a_red", "b_green", "c_blue"] and sorted(set(val.targets)) == [0, 2]
    perfect = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    metrics = evaluate(perfect, None, test_loader(cfg, val), torch.device("cpu"), nullcontext, 3)
    assert metrics["acc1"] == 100.0


def test_val_with_a_class_train_lacks_is_one_error_line(tmp_path):
    cfg = colour_folders(tmp_path, extra=("d_white",))
    build_dataset(cfg, train=True)
    with pytest.raises(DNRTError) as error:
        build_dataset(cfg, train=False)
    assert str(error.value) == (f"dataset folder: {tmp_path / 'val'} has 1 class folder(s) that {tmp_path / 'train'} "
                                f"lacks (d_white); the classes and their indices come from train/")


def test_every_image_pillow_reads_is_used_and_other_files_are_named(tmp_path, capsys):
    from PIL import Image

    cfg = colour_folders(tmp_path)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "train" / "a_red" / "moving.gif")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "train" / "a_red" / "scan.TIF")
    (tmp_path / "train" / "a_red" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "README").write_text("outside every class")
    capsys.readouterr()
    train = build_dataset(cfg, train=True)
    assert len(train) == 8 and sorted(Path(p).name for p, k in train.samples if k == 0) == \
        ["0.png", "1.png", "moving.gif", "scan.TIF"]
    assert torch.equal(train[2][0], train[0][0])  # the GIF reads as the PNG of its colour
    assert capsys.readouterr().out == (f"dataset folder: 2 file(s) in {tmp_path / 'train'} not used, outside a class "
                                       f"folder or not of an image extension Pillow opens: a_red/notes.txt, README\n")
    assert dataset_info(cfg)["num_classes"] == 3
