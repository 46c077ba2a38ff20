"""Models from the paper (Appendix A.1) and small non-piecewise-linear models for demos and checks."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["LeNet", "SigmoidBNCNN", "SigmoidMLP", "MODELS"]


class LeNet(nn.Sequential):
    """The paper's LeNet for 1x28x28 inputs: conv-maxpool (5, 1->6, 1, 2, 2), conv-maxpool (5, 6->16, 1, 0, 2),
    linear (400, 120), (120, 84), (84, 10), ReLU between.

    Example:
        >>> import torch
        >>> LeNet()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, activation: type[nn.Module] = nn.ReLU):
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=2), activation(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), activation(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120), activation(),
            nn.Linear(120, 84), activation(),
            nn.Linear(84, num_classes),
        )


class SigmoidBNCNN(nn.Sequential):
    """A small CNN that is not piecewise linear: conv -> BatchNorm -> sigmoid (x2), GELU head.

    Example:
        >>> import torch
        >>> SigmoidBNCNN()(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.Sigmoid(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.Sigmoid(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 32), nn.GELU(), nn.Linear(32, num_classes),
        )


class SigmoidMLP(nn.Sequential):
    """The two-layer sigmoid network of the paper's Figure 2 (any nonlinearity: here sigmoid, then a linear
    read-out).

    Example:
        >>> import torch
        >>> SigmoidMLP()(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int = 4, hidden: int = 5, out_features: int = 3):
        super().__init__(nn.Linear(in_features, hidden), nn.Sigmoid(), nn.Linear(hidden, hidden), nn.Sigmoid(),
                         nn.Linear(hidden, out_features))


#: Models by name for the command line: factory and the input shape of one sample.
MODELS = {
    "lenet": (LeNet, (1, 28, 28)),
    "sigmoid_bn_cnn": (SigmoidBNCNN, (1, 16, 16)),
    "sigmoid_mlp": (SigmoidMLP, (4,)),
}
