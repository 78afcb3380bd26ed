"""The segmentation network: a small FCN whose 1x1 classifier stage 2 calibrates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallFCN(nn.Module):
    """Encoder to 1/8 resolution, FCN-style decoder with skips back to 1/2, features bilinearly
    upsampled to full resolution plus a shallow full-resolution branch, then the 1x1 classifier."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.enc2 = nn.Sequential(conv_bn_relu(3, width, 2), conv_bn_relu(width, width))
        self.enc4 = nn.Sequential(conv_bn_relu(width, 2 * width, 2), conv_bn_relu(2 * width, 2 * width))
        self.enc8 = nn.Sequential(conv_bn_relu(2 * width, 4 * width, 2), conv_bn_relu(4 * width, 4 * width))
        self.dec4 = conv_bn_relu(6 * width, 2 * width)
        self.dec2 = conv_bn_relu(3 * width, 2 * width)
        self.full = conv_bn_relu(3, width // 2)
        self.feature_channels = 2 * width + width // 2
        self.classifier = nn.Conv2d(self.feature_channels, num_classes, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_channels, H, W) per-pixel features."""
        f2 = self.enc2(x)
        f4 = self.enc4(f2)
        f8 = self.enc8(f4)
        d4 = self.dec4(torch.cat([_upsample(f8, f4), f4], 1))
        d2 = self.dec2(torch.cat([_upsample(d4, f2), f2], 1))
        return torch.cat([_upsample(d2, x), self.full(x)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Features(nn.Module):
    """The network below its classifier, as a module (what stage 2 keeps frozen)."""

    def __init__(self, model: SmallFCN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class Predictor(nn.Module):
    """Frozen features, then a stage-2 head: class scores per pixel."""

    def __init__(self, model: SmallFCN, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(images))


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
