"""Models from the paper (Appendix A.1) and small non-piecewise-linear models for demos and checks."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LeNet", "VGG16BN", "SigmoidBNCNN", "SigmoidMLP", "SelfAttention", "MODELS", "build_model"]


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


class VGG16BN(nn.Sequential):
    """VGG16 with BatchNorm for 32x32 inputs (the paper's CIFAR-10 model): thirteen 3x3 conv-BN-ReLU layers in
    five blocks with max-pooling, then one linear layer from the 512 features (torchvision's ``vgg16_bn``
    expects 224x224 images and a 4096-wide head).

    Example:
        >>> import torch
        >>> VGG16BN()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, in_channels: int = 3, num_classes: int = 10, activation: type[nn.Module] = nn.ReLU):
        layers: list[nn.Module] = []
        c = in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), activation()]
                c = v
        super().__init__(*layers, nn.Flatten(), nn.Linear(512, num_classes))


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


class SelfAttention(nn.Module):
    """One self-attention layer on ``[batch, tokens, width]``: the q, k, v projections, fused attention
    (``F.scaled_dot_product_attention``, causal if asked), the output projection — the layer the long-sequence
    benchmarks and tests take Jv through.

    Example:
        >>> import torch
        >>> SelfAttention(width=16, heads=4, causal=True)(torch.randn(2, 10, 16)).shape
        torch.Size([2, 10, 16])
    """

    def __init__(self, width: int = 64, heads: int = 4, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, L, width = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(B, L, width))


#: Models by name for the command line: factory and the input shape of one sample.
MODELS = {
    "lenet": (LeNet, (1, 28, 28)),
    "vgg16_bn": (VGG16BN, (3, 32, 32)),
    "sigmoid_bn_cnn": (SigmoidBNCNN, (1, 16, 16)),
    "sigmoid_mlp": (SigmoidMLP, (4,)),
}


class _ToRGB(nn.Module):
    """Grayscale to three channels (torchvision's classifiers take RGB)."""

    def forward(self, x):
        return x.expand(-1, 3, -1, -1)


def build_model(spec: str, in_channels: int | None = None, num_classes: int = 10, size: int = 64) -> nn.Module:
    """A model by name: one of :data:`MODELS` (``lenet``, ``vgg16_bn``: the paper's; ``sigmoid_bn_cnn``,
    ``sigmoid_mlp``), a torchvision classifier (random weights; a grayscale input is repeated to RGB), or
    ``package.module:factory`` for your own (called with no arguments).

    Example:
        >>> build_model("lenet", in_channels=1).__class__.__name__
        'LeNet'
        >>> m = build_model("resnet18", in_channels=1, size=32)
        >>> m(__import__("torch").randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    import importlib

    if spec in MODELS:
        cls = MODELS[spec][0]
        if cls is SigmoidMLP:
            return cls(out_features=num_classes)
        default = MODELS[spec][1][0]
        return cls(in_channels=in_channels or default, num_classes=num_classes)
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load {spec!r}: {e}") from e
        return factory()
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        raise ValueError(f"unknown model {spec!r}: use {', '.join(MODELS)}, one of torchvision's classifiers "
                         f"({', '.join(names[:6])}, ...) or package.module:factory")
    kwargs = {"weights": None, "num_classes": num_classes}
    if spec.startswith("vit_"):
        kwargs["image_size"] = size  # torchvision's ViTs take any image size divisible by the patch size
    if spec in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    model = torchvision.models.get_model(spec, **kwargs)
    return nn.Sequential(_ToRGB(), model) if in_channels == 1 else model
