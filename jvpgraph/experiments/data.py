"""Datasets for the experiments, offline.

The default, :func:`digits`, is scikit-learn's 8x8 handwritten digits (1797 images, shipped inside the
package), upsampled to the model's size. FashionMNIST, KMNIST and CIFAR-10 load from a local folder through
torchvision's dataset classes (:func:`load`; nothing is downloaded). Images stay in ``[0, 1]``; :class:`Normalize` (the paper's channel-wise
mean 0, std 1, fitted on the training split) is a module put in front of the model, so that noise and attacks
act on pixels while the network sees preprocessed inputs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["Splits", "Normalize", "digits", "split_indices", "load", "DATASETS"]

#: Names :func:`load` accepts.
DATASETS = ("digits", "fashion-mnist", "kmnist", "cifar10")


@dataclasses.dataclass
class Splits:
    """Train, validation and test sets of ``(image in [0, 1], label)`` plus the training split's channel
    statistics (``mean``, ``std``: one value per channel) and the class count."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int
    name: str = ""

    def normalize(self) -> "Normalize":
        """The preprocessing as a module (put it in front of the model)."""
        return Normalize(self.mean, self.std)

    def __repr__(self):
        shape = tuple(self.train.tensors[0].shape[1:])
        return (f"Splits({self.name or 'data'}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
                f"images {shape}, {self.num_classes} classes)")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer (a linear map: Jv sees its ``1/std``).

    Example:
        >>> import torch
        >>> n = Normalize(torch.tensor([0.5]), torch.tensor([0.25]))
        >>> n(torch.full((1, 1, 2, 2), 0.75)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def split_indices(labels: torch.Tensor, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> list[torch.Tensor]:
    """Stratified random split of ``range(len(labels))`` into parts of the given fractions (each class split in
    the same proportions).

    Example:
        >>> import torch
        >>> parts = split_indices(torch.arange(10).repeat(10), (0.6, 0.2, 0.2))
        >>> [len(p) for p in parts], len(torch.cat(parts).unique())
        ([60, 20, 20], 100)
    """
    if abs(sum(fractions) - 1) > 1e-9 or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions={fractions}: expected positive fractions summing to 1")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        bounds = torch.tensor([0.0, *torch.tensor(fractions).cumsum(0).tolist()]) * len(idx)
        bounds = bounds.round().long()
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    return [torch.cat(p)[torch.randperm(sum(len(q) for q in p), generator=g)] for p in parts]


def digits(size: int = 16, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits as ``1 x size x size`` images in ``[0, 1]`` (bilinear upsampling; ``size=28``
    gives the paper's LeNet input), split stratified into train/val/test.

    Example:
        >>> data = digits(size=16)
        >>> data
        Splits(digits: train 1078, val 360, test 359, images (1, 16, 16), 10 classes)
        >>> x, y = data.train.tensors
        >>> float(x.min()) >= 0 and float(x.max()) <= 1, data.mean.shape
        (True, torch.Size([1]))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset ships with scikit-learn: pip install 'jvpgraph[experiments]'") from e
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        if size < 8:
            raise ValueError(f"size={size}: the digits are 8x8; use size >= 8")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    tr, va, te = split_indices(y, fractions, seed)
    mean = x[tr].mean(dim=(0, 2, 3))
    std = x[tr].std(dim=(0, 2, 3))
    return Splits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te]),
                  mean, std, 10, "digits")


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _torchvision(name: str, data_dir: str, train: bool):
    import torchvision.datasets as tvd

    if name in ("fashion-mnist", "kmnist"):
        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.KMNIST
        ds = cls(data_dir, train=train, download=False)
        return ds.data.unsqueeze(1).float() / 255.0, ds.targets.long(), len(ds.classes)

    class CIFAR10(tvd.CIFAR10):
        """torchvision's reader; the files must exist, their md5 sums are not checked (small test files)."""

        def _check_integrity(self):
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self):
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"Dataset metadata file not found: {path}")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    ds = CIFAR10(data_dir, train=train, download=False)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(ds.targets, dtype=torch.long), len(ds.classes)


_LAYOUT = {"fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
           "kmnist": "KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
           "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"}


def load(name: str = "digits", data_dir: str | None = None, size: int | None = None, val_fraction: float = 0.2,
         seed: int = 0, limit: int | None = None) -> Splits:
    """A dataset as :class:`Splits`: images in ``[0, 1]``, a stratified validation split of the training set,
    the official test set, channel statistics of the training split (the paper's preprocessing).

    Args:
        name: one of :data:`DATASETS`. ``digits`` ships with scikit-learn (train/val/test 60/20/20); the others
            are read from ``data_dir`` in torchvision's layout (``DIR/FashionMNIST/raw/train-images-idx3-ubyte``
            and the other three files, ``DIR/KMNIST/raw/...``, ``DIR/cifar-10-batches-py/data_batch_1``...).
        size: resize images to ``size x size`` (default: digits 28, the others as stored).
        limit: keep at most this many training and test images (quick runs).

    Example:
        >>> data = load("digits", size=28)
        >>> data.train.tensors[0].shape[1:], data.num_classes
        (torch.Size([1, 28, 28]), 10)
    """
    if name not in DATASETS:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if name == "digits":
        data = digits(size=size or 28, fractions=(0.6, 0.2, 0.2), seed=seed)
        if limit:
            data.train = TensorDataset(*(t[:limit] for t in data.train.tensors))
            data.test = TensorDataset(*(t[:limit] for t in data.test.tensors))
        return data
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from a local folder (nothing is downloaded): pass data_dir "
                         f"(--data-dir) holding {_LAYOUT[name]}")
    try:
        x, y, n_classes = _torchvision(name, data_dir, train=True)
        xt, yt, _ = _torchvision(name, data_dir, train=False)
    except RuntimeError as e:  # torchvision: "Dataset not found..."
        raise FileNotFoundError(f"dataset {name!r} not found under {data_dir!r}: expected {_LAYOUT[name]} "
                                f"(torchvision's layout; download it elsewhere, nothing is fetched here)") from e
    if limit:
        x, y, xt, yt = x[:limit], y[:limit], xt[:limit], yt[:limit]
    x, xt = _resize(x, size), _resize(xt, size)
    tr, va = split_indices(y, (1 - val_fraction, val_fraction), seed)
    mean, std = x[tr].mean(dim=(0, 2, 3)), x[tr].std(dim=(0, 2, 3))
    return Splits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(xt, yt), mean, std,
                  n_classes, name)
