"""Image classification data for the CondenseNet example, held in memory as uint8 tensors.

CIFAR-10/100 (32x32) come through torchvision's download; digits (bundled with scikit-learn) and
Fashion-MNIST (28x28, read from a local folder of the original idx files) work offline. Digits are
upsampled from 8x8 to 16x16 (8x8 would shrink to 2x2 after CondenseNet's two poolings; 16x16 is 4x
cheaper than 32x32 on a CPU). Grey images keep their one channel (the network takes ``in_chans=1``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataUnavailable(Exception):
    """A data set is not where it was looked for; the message says how to get it."""


@dataclass
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, size: int, generator: torch.Generator) -> Split:
        """``size`` random images (all of them when ``size`` is not smaller)."""
        if size >= len(self):
            return self
        keep = torch.randperm(len(self), generator=generator)[:size]
        return Split(self.images[keep], self.labels[keep])


@dataclass
class ImageData:
    name: str
    train: Split
    test: Split
    num_classes: int
    flip: bool  # whether horizontal flips are label-preserving (not for digits)

    @property
    def image_size(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.train.images.shape[1:])


def _cifar(name: str, root: Path, download: bool) -> ImageData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise DataUnavailable(
            f"{name} is not in {root} ({error}); run with --download (needs internet) or put the "
            f"extracted python version of {name} there (--data-dir)"
        ) from None
    except OSError as error:  # no network: URLError and friends
        raise DataUnavailable(
            f"cannot download {name} into {root} ({error}); connect to the internet, or use an offline "
            "data set: --dataset digits or --dataset fashion-mnist"
        ) from None
    train, test = (
        Split(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
        for s in splits
    )
    return ImageData(name, train, test, num_classes=10 if name == "cifar10" else 100, flip=True)


def _digits(seed: int) -> ImageData:
    """scikit-learn's 1797 8x8 digits (values 0..16), upsampled to 16x16; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    images = torch.nn.functional.interpolate(images, size=16, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return ImageData(
        "digits", Split(images[train], labels[train]), Split(images[test], labels[test]), 10, flip=False
    )


def read_idx(folder: Path, stem: str) -> np.ndarray:
    """An idx file (``stem`` or ``stem.gz``) as a numpy array of its declared shape."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.exists():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            dims = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise DataUnavailable(
        f"Fashion-MNIST file {stem}(.gz) is not in {folder}; install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts the idx files in "
        f"{FASHION_MNIST_DIR}) or download the four idx files from "
        "https://github.com/zalandoresearch/fashion-mnist into a folder and pass --data-dir FOLDER"
    )


def _fashion_mnist(folder: Path) -> ImageData:
    splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images = torch.from_numpy(read_idx(folder, image_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(folder, label_file).astype(np.int64))
        splits[split] = Split(images, labels)
    return ImageData("fashion-mnist", splits["train"], splits["test"], 10, flip=True)


def load_data(name: str, data_dir: str | None, *, download: bool, subset: int | None, seed: int) -> ImageData:
    """Load ``name`` (one of ``DATASETS``), optionally cut to ``subset`` train and test images."""
    if name in ("cifar10", "cifar100"):
        data = _cifar(name, Path(data_dir or "data"), download)
    elif name == "digits":
        data = _digits(seed)
    elif name == "fashion-mnist":
        data = _fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR)
    else:
        raise ValueError(f"unknown data set {name!r}; pick one of {', '.join(DATASETS)}")
    if subset is not None:
        generator = torch.Generator().manual_seed(seed)
        data.train = data.train.subset(subset, generator)
        data.test = data.test.subset(subset, generator)
    return data


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images, in the 0..1 scale."""
    values = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return values.mean(1), values.std(1).clamp_min(1e-3)
