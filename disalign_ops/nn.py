"""nn.Module heads that turn a trained classifier into a DisAlign head (paper sec. 3.2).

Each head freezes the original classifier and adds the learnable calibration of eq. 5:
``zhat = s * (magnitude * z + margin) + (1 - s) * z``, i.e. eq. 6 with ``alpha = magnitude - 1``,
``beta = margin`` and ``s = sigmoid(confidence layer(x))``. Magnitude starts at 1 and margin at 0,
so a fresh head reproduces the frozen classifier exactly.

``head(x)`` returns the calibrated logits; ``head.calibration_inputs(x)`` returns the pieces that
``DisAlignLoss`` feeds to the fused op, which never materialises the calibrated logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .api import calibrate, disalign_cross_entropy
from .reweight import generalized_reweight


class CalibrationInputs(NamedTuple):
    """Frozen logits and the calibration parameters of one forward pass (eq. 6 form)."""

    logits: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    confidence: torch.Tensor | None


class CosineLinear(nn.Module):
    """Cosine classifier ("*" heads of the paper): ``scale * <x/|x|, w_j/|w_j|>``."""

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0, learn_scale: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class _DisAlignHead(nn.Module):
    """Shared machinery: frozen classifier, magnitude/margin over the calibrated classes, confidence."""

    def __init__(self, classifier: nn.Module, num_classes: int, confidence: nn.Module | None, backend: str | None):
        super().__init__()
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.magnitude = nn.Parameter(torch.ones(num_classes))
        self.margin = nn.Parameter(torch.zeros(num_classes))
        self.confidence = confidence
        self.backend = backend

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()  # frozen: its BatchNorm/Dropout (if any) stay in inference mode
        return self

    def calibration_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta) of eq. 6 over all logit columns."""
        return self.magnitude - 1, self.margin

    def confidence_scores(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row confidence s = sigmoid(v^T x + b): (N,) for features, (B, H, W) for feature maps."""
        return None if self.confidence is None else torch.sigmoid(self.confidence(x)).squeeze(1)

    def calibration_inputs(self, x: torch.Tensor) -> CalibrationInputs:
        with torch.no_grad():
            logits = self.classifier(x)
        alpha, beta = self.calibration_params()
        return CalibrationInputs(logits, alpha, beta, self.confidence_scores(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.calibration_inputs(x)
        return calibrate(inputs.logits, inputs.alpha, inputs.beta, confidence=inputs.confidence, backend=self.backend)


class DisAlignLinear(_DisAlignHead):
    """DisAlign head over an ``nn.Linear`` or ``CosineLinear`` classifier of (N, D) features."""

    @classmethod
    def from_linear(cls, classifier: nn.Module, input_aware: bool = True, backend: str | None = None) -> "DisAlignLinear":
        """``input_aware=False`` gives the input-agnostic ablation (s = 1 for every input)."""
        if not isinstance(classifier, (nn.Linear, CosineLinear)):
            raise TypeError(f"classifier must be nn.Linear or CosineLinear, got {type(classifier).__name__}")
        confidence = nn.Linear(classifier.in_features, 1) if input_aware else None
        return cls(classifier, classifier.out_features, confidence, backend)


class DisAlignConv2d(_DisAlignHead):
    """DisAlign head over a 1x1 ``nn.Conv2d`` segmentation classifier; per-pixel confidence."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_aware: bool = True, backend: str | None = None) -> "DisAlignConv2d":
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
            raise TypeError(f"conv must be a 1x1 nn.Conv2d with groups=1, got {conv!r}")
        confidence = nn.Conv2d(conv.in_channels, 1, kernel_size=1) if input_aware else None
        return cls(conv, conv.out_channels, confidence, backend)


class DisAlignROIHead(_DisAlignHead):
    """DisAlign head over a detector's (K+1)-way ROI classifier: foreground calibrated, background untouched.

    ``magnitude`` and ``margin`` have K entries (foreground classes); the background column
    (``background_index``, last by default as in Detectron2) gets alpha = beta = 0.
    """

    def __init__(self, cls_score: nn.Linear, background_index: int = -1, input_aware: bool = True, backend=None):
        if not isinstance(cls_score, nn.Linear):
            raise TypeError(f"cls_score must be nn.Linear, got {type(cls_score).__name__}")
        num_logits = cls_score.out_features
        if num_logits < 2:
            raise ValueError(f"cls_score must have K+1 >= 2 outputs, got {num_logits}")
        if not -num_logits <= background_index < num_logits:
            raise ValueError(f"background_index must be in [-{num_logits}, {num_logits}), got {background_index}")
        confidence = nn.Linear(cls_score.in_features, 1) if input_aware else None
        super().__init__(cls_score, num_logits - 1, confidence, backend)
        self.background_index = background_index % num_logits

    @classmethod
    def from_linear(cls, cls_score: nn.Linear, background_index: int = -1, input_aware: bool = True, backend=None):
        return cls(cls_score, background_index, input_aware, backend)

    def calibration_params(self):
        zero = self.magnitude.new_zeros(1)
        i = self.background_index
        alpha = torch.cat([self.magnitude[:i] - 1, zero, self.magnitude[i:] - 1])
        beta = torch.cat([self.margin[:i], zero, self.margin[i:]])
        return alpha, beta


class DisAlignLoss(nn.Module):
    """Generalized re-weighted KL loss (paper eq. 8-11) through the fused op.

    ``class_counts`` are training counts per calibrated class. With ``background_index`` set, the
    counts are for the foreground classes only and the background class gets weight 1 (the paper's
    detection setting). Call it with a head's ``calibration_inputs(x)`` and the targets.
    """

    def __init__(
        self,
        class_counts,
        rho: float,
        ignore_index: int = -100,
        reduction: str = "mean",
        background_index: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        weight = generalized_reweight(class_counts, rho)
        if background_index is not None:
            num_logits = weight.numel() + 1
            if not -num_logits <= background_index < num_logits:
                raise ValueError(f"background_index must be in [-{num_logits}, {num_logits}), got {background_index}")
            i = background_index % num_logits
            weight = torch.cat([weight[:i], weight.new_ones(1), weight[i:]])
        self.register_buffer("weight", weight)
        self.rho = rho
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, inputs: CalibrationInputs, target: torch.Tensor) -> torch.Tensor:
        return disalign_cross_entropy(
            inputs.logits,
            target,
            inputs.alpha,
            inputs.beta,
            confidence=inputs.confidence,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
        )
