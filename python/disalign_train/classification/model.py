"""Backbones (``--model``), classifiers and augmentation for the classification trainer.

``mlp`` and ``small-cnn`` use no batch statistics (GroupNorm, not BatchNorm), so a run under
torchrun computes the same function of the same global batches as one process. ``resnet18`` and
``resnet50`` are torchvision's, randomly initialised (no pretrained download), with BatchNorm as
published (under torchrun each rank normalises its own share of the batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from disalign_ops.nn import CosineLinear

BACKBONES = ("mlp", "small-cnn", "resnet18", "resnet50")
RESNET_FEATURES = {"resnet18": 512, "resnet50": 2048}
CLASSIFIERS = ("linear", "cosine")


def feature_dim(name: str, width: int) -> int:
    """Features a backbone ends in: ``width`` for ours, the fixed width of a ResNet."""
    return RESNET_FEATURES.get(name, width)


def build_backbone(name: str, image_shape: tuple[int, int, int], width: int = 128) -> nn.Module:
    """``mlp``: two hidden layers over the flattened image (8x8 digits). ``small-cnn``: three conv blocks
    with GroupNorm and global average pooling (any image size); both end in ``width`` features.
    ``resnet18``/``resnet50``: torchvision's, without its fc layer (512/2048 features)."""
    channels = image_shape[0]
    if name in RESNET_FEATURES:
        import torchvision

        resnet = getattr(torchvision.models, name)(weights=None)
        if channels != 3:
            resnet.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        resnet.fc = nn.Identity()
        return resnet
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(image_shape), 2 * width),
            nn.ReLU(inplace=True),
            nn.Linear(2 * width, width),
            nn.ReLU(inplace=True),
        )
    if name == "small-cnn":
        def block(c_in, c_out, stride):
            norm = nn.GroupNorm(math.gcd(8, c_out), c_out)
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm, nn.ReLU(inplace=True)]

        return nn.Sequential(
            *block(channels, width // 4, 1),
            *block(width // 4, width // 2, 2),
            *block(width // 2, width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


def build_classifier(kind: str, feature_dim: int, num_classes: int, cosine_scale: float = 16.0) -> nn.Module:
    """The paper's two heads: dot product (eq. 2, with bias) or cosine similarity (eq. 3)."""
    if kind == "linear":
        return nn.Linear(feature_dim, num_classes)
    if kind == "cosine":
        return CosineLinear(feature_dim, num_classes, scale=cosine_scale)
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {kind!r}")


class ImageClassifier(nn.Module):
    """Feature extractor f and classifier head h of eq. 1."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))


def augment(images: torch.Tensor, max_shift: float, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` of the image size (zero fill), and random horizontal
    flips when ``hflip``: one affine resampling of the whole batch."""
    if max_shift == 0 and not hflip:
        return images
    n = images.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if hflip:
        theta[:, 0, 0] = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    # normalised coordinates span 2 units per image side
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * 2 * max_shift
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
