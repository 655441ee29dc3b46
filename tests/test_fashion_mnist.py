"""The fashion_mnist dataset: data_root's copy, Debian's gzipped files in place, the offline error, train_subset."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dnrt.errors import DNRTError
from dnrt.tool import data
from dnrt.tool.cli import main
from dnrt.tool.config import resolve
from dnrt.tool.data import build_dataset

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.2860, 0.3530


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format written by hand: magic 0x0000080N (uint8, N dimensions), N big-endian sizes, the bytes."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder, seed: int, n_train: int = 20, n_test: int = 10, gz: bool = True) -> dict[str, np.ndarray]:
    """Random images and labels (class i % 10) as the four files of the MNIST family; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No download, a fresh 'used' line per test, and Debian's folder moved to tmp_path/debian (absent at first)."""
    def no_network(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(data, "_download", no_network)
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    return tmp_path / "debian"


def normalised(image: np.ndarray) -> torch.Tensor:
    return (torch.tensor(image, dtype=torch.float32) / 255 - MEAN) / STD


def test_reads_debian_gzip_files_in_place(offline, tmp_path, capsys):
    arrays = write_set(offline, seed=0)
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path / "empty")})
    train, test = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    out = capsys.readouterr().out
    assert out == f"fashion_mnist: Debian's dataset-fashion-mnist files in {offline} (none in data_root " \
                  f"{tmp_path / 'empty'})\n"  # one line for both splits
    assert len(train) == 20 and len(test) == 10
    image, label = test[7]
    assert image.shape == (1, 28, 28) and label == 1  # 7 * 3 % 10
    assert torch.allclose(image[0], normalised(arrays["t10k-images-idx3-ubyte"][7]), atol=1e-6)
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert not (tmp_path / "empty").exists()  # nothing copied or unpacked


def test_data_root_copy_comes_first(offline, tmp_path, capsys):
    write_set(offline, seed=0)
    copy = write_set(tmp_path / "root" / "FashionMNIST" / "raw", seed=1, n_test=5, gz=False)  # torchvision's layout
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path / "root")})
    test = build_dataset(cfg, train=False)
    assert capsys.readouterr().out == f"fashion_mnist: data_root's copy in {tmp_path / 'root/FashionMNIST/raw'}\n"
    assert len(test) == 5
    assert torch.allclose(test[4][0][0], normalised(copy["t10k-images-idx3-ubyte"][4]), atol=1e-6)


def test_none_found_is_one_line_naming_both_places(offline, tmp_path, capsys):
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path / "empty")})
    with pytest.raises(DNRTError) as error:
        build_dataset(cfg, train=True)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"dataset fashion_mnist: found neither in {tmp_path / 'empty/FashionMNIST/raw'} "
                       f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                       f"t10k-labels-idx1-ubyte.gz) nor in {offline} (Debian: apt install dataset-fashion-mnist), "
                       f"and the download failed")
    write_set(offline, seed=0, gz=False)  # unpacked files in Debian's folder are not what the package installs
    with pytest.raises(DNRTError, match="found neither"):
        build_dataset(cfg, train=True)


def test_damaged_idx_file_is_named(offline, tmp_path):
    write_set(offline, seed=0)
    with gzip.open(offline / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((10, 28, 28)))[:-784])  # the header says 10 images, 9 follow
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path / "empty")})
    with pytest.raises(DNRTError, match=r"t10k-images-idx3-ubyte.gz holds 7056 bytes of data, its header says "
                                        r"\[10, 28, 28\]; the file is damaged"):
        build_dataset(cfg, train=False)


def test_train_subset_takes_the_first_of_each_class(offline, tmp_path):
    write_set(offline, seed=0, n_train=40)
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path / "empty"), "train_subset": 25})
    train = build_dataset(cfg, train=True)
    assert train.indices == list(range(20))  # 25 // 10 = 2 per class: the first two of each class (i % 10)
    assert len(build_dataset(cfg, train=False)) == 10  # the test set stays whole
    with pytest.raises(DNRTError, match="train_subset=9 is fewer than one image for each of the 10 classes"):
        build_dataset({**cfg, "train_subset": 9}, train=True)
    with pytest.raises(DNRTError, match="train_subset=25 with the long-tailed digits_lt: choose one"):
        build_dataset(resolve({"dataset": "digits_lt", "train_subset": 25}), train=True)


def test_dnrt_train_offline_on_debian_files(offline, tmp_path, capsys):
    write_set(offline, seed=0)
    run = tmp_path / "run"
    argv = ["train", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"), "--dataset", "fashion_mnist", "--data_root",
            str(tmp_path / "empty"), "--image_size", "28", "--model", "mlp", "--model_kwargs", "{'hidden': 16}",
            "--batch_size", "10", "--epochs", "1", "--warmup_epochs", "0", "--output_dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"data: fashion_mnist from {offline}: 20 training, 10 test images" in out
    rows = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["test_acc1"] <= 100


DEBIAN = data.DEBIAN_FASHION_MNIST


@pytest.mark.skipif(not all((DEBIAN / f"{name}.gz").is_file() for name in FILES),
                    reason=f"Debian's dataset-fashion-mnist is not installed (no {DEBIAN})")
def test_debian_package_files(monkeypatch, tmp_path):
    """The real files: sizes, and the first test image and label against the gzipped bytes read here."""
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    cfg = resolve({"dataset": "fashion_mnist", "data_root": str(tmp_path), "train_subset": 600})
    test = build_dataset(cfg, train=False)
    raw_images = gzip.decompress((DEBIAN / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw_labels = gzip.decompress((DEBIAN / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert len(test) == 10000
    first = np.frombuffer(raw_images[16:16 + 784], dtype=np.uint8).reshape(28, 28)
    assert test[0][1] == raw_labels[8] == 9  # Fashion-MNIST's first test image is an ankle boot
    assert torch.allclose(test[0][0][0], normalised(first), atol=1e-6)
    train = build_dataset(cfg, train=True)
    assert len(train.dataset) == 60000
    assert torch.bincount(train.dataset.targets[train.indices]).tolist() == [60] * 10
