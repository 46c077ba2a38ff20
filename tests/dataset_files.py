"""Small dataset files in the real on-disk formats (written from the format specs, not with torchvision),
for testing the loaders offline."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic 0x0000 08 <ndim>, big-endian int32 sizes, then uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist_like(root: str, folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    """``root/folder/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with random 28x28 images whose class
    is written into their brightness (so a model can learn it). Returns the arrays."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        images[:, 4:24, 4:24] += (labels * 19)[:, None, None]
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
        out[split] = (images.astype(np.uint8), labels)
    return out


def write_cifar10(root: str, per_batch: int = 10, n_test: int = 10, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py/`` with five training batches, a test batch and ``batches.meta`` as CIFAR-10's
    python version stores them: pickled dicts, ``data`` uint8 (N, 3072) = R, G, B planes of 32x32."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    out = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        out[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return out
