"""The dataset loaders read FashionMNIST, KMNIST and CIFAR-10 from local files in their real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_files import write_cifar10, write_mnist_like
from jvpgraph.experiments.data import DATASETS, load


@pytest.mark.parametrize("name,folder", [("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_like_from_idx_files(tmp_path, name, folder):
    arrays = write_mnist_like(str(tmp_path), folder, n_train=60, n_test=20)
    data = load(name, str(tmp_path), val_fraction=0.2, seed=0)
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 20
    assert len(data.val) == 10  # stratified: 6 images per class, one of each class to validation
    x, y = data.test.tensors
    assert x.shape == (20, 1, 28, 28) and data.num_classes == 10
    images, labels = arrays["t10k"]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)  # pixel for pixel, in order
    assert y.tolist() == labels.tolist()
    # train and validation together are the training file, each image once
    xs = torch.cat([data.train.tensors[0], data.val.tensors[0]]).flatten(1)
    want = torch.from_numpy(arrays["train"][0]).float().flatten(1) / 255
    assert sorted(map(tuple, xs.tolist())) == sorted(map(tuple, want.tolist()))
    # the channel statistics are the training split's
    torch.testing.assert_close(data.mean, data.train.tensors[0].mean(dim=(0, 2, 3)))


def test_cifar10_from_python_batches(tmp_path):
    arrays = write_cifar10(str(tmp_path), per_batch=10, n_test=10)
    data = load("cifar10", str(tmp_path), val_fraction=0.2)
    assert len(data.train) + len(data.val) == 50 and len(data.test) == 10 and data.num_classes == 10
    x, y = data.test.tensors
    raw, labels = arrays["test_batch"]
    assert x.shape == (10, 3, 32, 32) and y.tolist() == labels
    # the row layout is R, G, B planes of 32x32
    torch.testing.assert_close(x[3, 1], torch.from_numpy(raw[3, 1024:2048].reshape(32, 32)).float() / 255)
    assert data.mean.shape == (3,)


def test_resize_and_limit(tmp_path):
    write_mnist_like(str(tmp_path), "KMNIST", n_train=40, n_test=20)
    data = load("kmnist", str(tmp_path), size=16, limit=30)
    assert data.train.tensors[0].shape[1:] == (1, 16, 16) and len(data.train) + len(data.val) == 30
    assert len(data.test) == 20


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw"):
        load("fashion-mnist", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        load("cifar10")
    with pytest.raises(ValueError, match=", ".join(DATASETS)):
        load("mnist")
    assert np  # numpy is what the format writers use
