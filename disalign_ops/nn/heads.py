"""The DisAlign heads: a frozen classifier plus the learnable calibration of paper eq. 5.

``zhat = s * (magnitude * z + margin) + (1 - s) * z``, i.e. eq. 6 with ``alpha = magnitude - 1``,
``beta = margin`` and ``s = sigmoid(confidence layer(x))``. With ``init="identity"`` (the default)
magnitude starts at 1 and margin at 0, so a fresh head reproduces the frozen classifier exactly.
``init="authors"`` starts the head as the authors' released code does, per head (see each class);
``paper_recipe`` builds a head with every option the authors used for that task.

``head(x)`` returns the calibrated logits; ``head.calibration_inputs(x)`` returns the pieces that
``DisAlignLoss`` feeds to the fused op, which never materialises the calibrated logits.
``ClassifierHead`` is the uncalibrated head with the same interface (stage-1 baseline, re-weight-only
ablation, cRT).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import accumulation_dtype
from ..api import calibrate
from .cosine import CosineLinear

INITS = ("identity", "authors")
CONFIDENCE_INPUTS = ("features", "normalized")  # what the confidence layer reads: x or x/|x| (per row / pixel)
CONFIDENCE_LAYERS = ("linear", "conv-bn-relu")  # DisAlignConv2d only


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class CalibrationInputs(NamedTuple):
    """Frozen logits and the calibration parameters of one forward pass (eq. 6 form)."""

    logits: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    confidence: torch.Tensor | None


class _DisAlignHead(nn.Module):
    """Shared machinery: frozen classifier, magnitude/margin over the calibrated classes, confidence.

    ``alpha = magnitude - magnitude_offset``: offset 1 is the eq. 5 form (magnitude init 1 is the
    identity); offset 0 is the authors' classification form, where the parameter *is* alpha (their
    ``logit_scale``, init 1, so a fresh head gives (1 + s) z). Under plain SGD the two forms follow
    the same trajectory from the same alpha; they differ under weight decay and in what ``magnitude``
    means, so the offset is kept with the head (``extra_repr``).
    """

    def __init__(
        self,
        classifier: nn.Module,
        num_classes: int,
        confidence: nn.Module | None,
        backend: str | None,
        *,
        init: str = "identity",
        confidence_input: str = "features",
        magnitude_offset: float = 1.0,
    ):
        super().__init__()
        check_choice("init", init, INITS)
        check_choice("confidence_input", confidence_input, CONFIDENCE_INPUTS)
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.magnitude = nn.Parameter(torch.ones(num_classes))
        self.margin = nn.Parameter(torch.zeros(num_classes))
        self.confidence = confidence
        self.backend = backend
        self.init = init
        self.confidence_input = confidence_input
        self.magnitude_offset = float(magnitude_offset)

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()  # frozen: its BatchNorm/Dropout (if any) stay in inference mode
        return self

    def calibration_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta) of eq. 6 over all logit columns."""
        return self.magnitude - self.magnitude_offset, self.margin

    def confidence_scores(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row confidence s = sigmoid(layer(x)): (N,) for features, (B, H, W) for feature maps."""
        if self.confidence is None:
            return None
        if self.confidence_input == "normalized":
            x = F.normalize(x, dim=1)
        return torch.sigmoid(self.confidence(x)).squeeze(1)

    def calibration_inputs(self, x: torch.Tensor) -> CalibrationInputs:
        with torch.no_grad():
            logits = self.classifier(x)
        alpha, beta = self.calibration_params()
        return CalibrationInputs(logits, alpha, beta, self.confidence_scores(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.calibration_inputs(x)
        return calibrate(inputs.logits, inputs.alpha, inputs.beta, confidence=inputs.confidence, backend=self.backend)

    def extra_repr(self) -> str:
        return f"init={self.init!r}, confidence_input={self.confidence_input!r}, magnitude_offset={self.magnitude_offset}"


def _linear_features(classifier: nn.Module, what: str) -> tuple[int, int]:
    if not isinstance(classifier, (nn.Linear, CosineLinear)):
        raise TypeError(f"{what} must be nn.Linear or CosineLinear, got {type(classifier).__name__}")
    return classifier.in_features, classifier.out_features


class DisAlignLinear(_DisAlignHead):
    """DisAlign head over an ``nn.Linear`` or ``CosineLinear`` classifier of (N, D) features.

    ``init="authors"`` (cvpods ``DisAlignLinear`` / ``DisAlignNormalizedLinear``): ``magnitude`` is
    alpha itself with value 1 (a fresh head gives (1 + s) z, not z), margin 0, the confidence weight
    the constant 0.1 and its bias PyTorch's ``nn.Linear`` default.
    """

    @classmethod
    def from_linear(
        cls,
        classifier: nn.Module,
        input_aware: bool = True,
        backend: str | None = None,
        *,
        init: str = "identity",
        confidence_input: str = "features",
    ) -> "DisAlignLinear":
        """``input_aware=False`` gives the input-agnostic ablation (s = 1 for every input);
        ``confidence_input="normalized"`` feeds x/|x| to the confidence layer."""
        in_features, out_features = _linear_features(classifier, "classifier")
        check_choice("init", init, INITS)
        confidence = nn.Linear(in_features, 1) if input_aware else None
        if init == "authors" and confidence is not None:
            nn.init.constant_(confidence.weight, 0.1)
        return cls(
            classifier, out_features, confidence, backend, init=init, confidence_input=confidence_input,
            magnitude_offset=0.0 if init == "authors" else 1.0,
        )

    @classmethod
    def paper_recipe(cls, classifier: nn.Module, input_aware: bool = True, backend: str | None = None):
        """The authors' classification head: their init; a cosine classifier's confidence reads x/|x|."""
        normalized = isinstance(classifier, CosineLinear)
        return cls.from_linear(
            classifier, input_aware, backend, init="authors", confidence_input="normalized" if normalized else "features"
        )


class DisAlignConv2d(_DisAlignHead):
    """DisAlign head over a 1x1 ``nn.Conv2d`` segmentation classifier; per-pixel confidence.

    ``confidence="linear"`` (default) is a 1x1 conv with bias; ``"conv-bn-relu"`` is the authors'
    mmseg ``ConvModule``: 1x1 conv without bias -> BatchNorm2d -> ReLU, then the sigmoid, so
    s >= 0.5. ``init="authors"``: magnitude 1 and margin 0 in the eq. 5 form (the identity, as in
    their ``DisAlignFCNHead``) and the confidence conv initialised as mmcv's ``ConvModule`` does
    (Kaiming normal, fan_out, ReLU gain; bias 0; BatchNorm weight 1, bias 0).
    """

    confidence_layer = "linear"  # which CONFIDENCE_LAYERS entry built ``confidence`` (set by from_conv)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        input_aware: bool = True,
        backend: str | None = None,
        *,
        init: str = "identity",
        confidence: str = "linear",
    ) -> "DisAlignConv2d":
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
            raise TypeError(f"conv must be a 1x1 nn.Conv2d with groups=1, got {conv!r}")
        check_choice("init", init, INITS)
        check_choice("confidence", confidence, CONFIDENCE_LAYERS)
        layer = None
        if input_aware:
            if confidence == "linear":
                layer = nn.Conv2d(conv.in_channels, 1, kernel_size=1)
            else:
                layer = nn.Sequential(
                    nn.Conv2d(conv.in_channels, 1, kernel_size=1, bias=False), nn.BatchNorm2d(1), nn.ReLU()
                )
            if init == "authors":
                first = layer if confidence == "linear" else layer[0]
                nn.init.kaiming_normal_(first.weight, mode="fan_out", nonlinearity="relu")
                if first.bias is not None:
                    nn.init.zeros_(first.bias)
        head = cls(conv, conv.out_channels, layer, backend, init=init)
        head.confidence_layer = confidence
        return head

    @classmethod
    def paper_recipe(cls, conv: nn.Conv2d, input_aware: bool = True, backend: str | None = None):
        """The authors' segmentation head: conv-bn-relu confidence, mmcv init."""
        return cls.from_conv(conv, input_aware, backend, init="authors", confidence="conv-bn-relu")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, confidence_layer={self.confidence_layer!r}"


class DisAlignROIHead(_DisAlignHead):
    """DisAlign head over a detector's (K+1)-way ROI classifier: foreground calibrated, background untouched.

    ``cls_score`` is an ``nn.Linear`` or a ``CosineLinear``. ``magnitude`` and ``margin`` have K
    entries (foreground classes); the background column (``background_index``, last by default as
    in Detectron2) gets alpha = beta = 0. ``init="authors"`` (cvpods
    ``DisAlign[Cosine]FastRCNNOutputLayers``): magnitude 1 and margin 0 in the eq. 5 form (the
    identity), confidence weight drawn from N(0, 0.01^2) and bias 0.
    """

    def __init__(
        self,
        cls_score: nn.Module,
        background_index: int = -1,
        input_aware: bool = True,
        backend: str | None = None,
        *,
        init: str = "identity",
        confidence_input: str = "features",
    ):
        in_features, num_logits = _linear_features(cls_score, "cls_score")
        if num_logits < 2:
            raise ValueError(f"cls_score must have K+1 >= 2 outputs, got {num_logits}")
        if not -num_logits <= background_index < num_logits:
            raise ValueError(f"background_index must be in [-{num_logits}, {num_logits}), got {background_index}")
        check_choice("init", init, INITS)
        confidence = nn.Linear(in_features, 1) if input_aware else None
        if init == "authors" and confidence is not None:
            nn.init.normal_(confidence.weight, std=0.01)
            nn.init.zeros_(confidence.bias)
        super().__init__(cls_score, num_logits - 1, confidence, backend, init=init, confidence_input=confidence_input)
        self.background_index = background_index % num_logits

    @classmethod
    def from_linear(
        cls,
        cls_score: nn.Module,
        background_index: int = -1,
        input_aware: bool = True,
        backend: str | None = None,
        *,
        init: str = "identity",
        confidence_input: str = "features",
    ) -> "DisAlignROIHead":
        return cls(cls_score, background_index, input_aware, backend, init=init, confidence_input=confidence_input)

    @classmethod
    def paper_recipe(cls, cls_score: nn.Module, background_index: int = -1, input_aware: bool = True, backend=None):
        """The authors' detection head: their init; the confidence reads the raw RoI features, also over a
        cosine ``cls_score`` (their cosine ROI head normalises inside the classifier only)."""
        return cls(cls_score, background_index, input_aware, backend, init="authors", confidence_input="features")

    def calibration_params(self):
        zero = self.magnitude.new_zeros(1)
        i = self.background_index
        alpha = self.magnitude - self.magnitude_offset
        alpha = torch.cat([alpha[:i], zero, alpha[i:]])
        beta = torch.cat([self.margin[:i], zero, self.margin[i:]])
        return alpha, beta


class ClassifierHead(nn.Module):
    """A classifier as an uncalibrated head: plain logits, with the DisAlign heads' interface.

    ``calibration_inputs`` gives alpha = beta = 0 and no confidence, so ``DisAlignLoss`` computes
    the plain (re-weighted) cross entropy of the logits and the same stage-2 loop trains it.
    ``frozen=False`` (default): the classifier is trained (re-weight-only ablation, cRT);
    ``frozen=True``: it is frozen and kept in inference mode, as the DisAlign heads' classifier
    (the stage-1 baseline as a head).
    """

    def __init__(self, classifier: nn.Module, *, frozen: bool = False):
        super().__init__()
        self.classifier = classifier
        self.frozen = bool(frozen)
        self.classifier.requires_grad_(not self.frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.classifier.eval()
        return self

    def calibration_inputs(self, x: torch.Tensor) -> CalibrationInputs:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            logits = self.classifier(x)
        zeros = torch.zeros(logits.shape[1], dtype=accumulation_dtype(logits.dtype), device=logits.device)
        return CalibrationInputs(logits, zeros, zeros, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def extra_repr(self) -> str:
        return f"frozen={self.frozen}"
