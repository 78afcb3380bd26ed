"""The generalized re-weighted loss of the heads (paper eq. 8-11), through the fused op."""

from __future__ import annotations

import torch
from torch import nn

from ..api import disalign_cross_entropy
from ..reweight import generalized_reweight
from .heads import CalibrationInputs, check_choice

NORMALIZATIONS = ("weights", "elements")


class DisAlignLoss(nn.Module):
    """Generalized re-weighted KL loss (paper eq. 8-11) through the fused op.

    ``class_counts`` are training counts per calibrated class. With ``background_index`` set, the
    counts are for the foreground classes only and the background class gets weight 1 (the paper's
    detection setting). Call it with a head's ``calibration_inputs(x)`` and the targets.

    ``normalize`` decides the denominator of ``reduction="mean"``:

    - ``"weights"`` (default): ``F.cross_entropy``'s rule, the sum of the target weights of the
      non-ignored elements (the authors' classification and detection code);
    - ``"elements"``: the number of all target elements, ignored ones included, as mmseg's
      ``cross_entropy`` with ``avg_non_ignore=False`` (the authors' segmentation code): the
      weighted losses are summed by the fused op and divided by ``target.numel()``.
    """

    def __init__(
        self,
        class_counts,
        rho: float,
        ignore_index: int = -100,
        reduction: str = "mean",
        background_index: int | None = None,
        backend: str | None = None,
        *,
        normalize: str = "weights",
    ):
        super().__init__()
        check_choice("normalize", normalize, NORMALIZATIONS)
        if normalize == "elements" and reduction != "mean":
            raise ValueError(f"normalize='elements' only applies to reduction='mean', got reduction={reduction!r}")
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
        self.normalize = normalize
        self.backend = backend

    def forward(self, inputs: CalibrationInputs, target: torch.Tensor) -> torch.Tensor:
        by_elements = self.normalize == "elements"
        loss = disalign_cross_entropy(
            inputs.logits,
            target,
            inputs.alpha,
            inputs.beta,
            confidence=inputs.confidence,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction="sum" if by_elements else self.reduction,
            backend=self.backend,
        )
        # numel is static metadata (no sync, compiles); 0 elements give 0/0 = nan, as a mean of nothing.
        return loss / target.numel() if by_elements else loss

    def extra_repr(self) -> str:
        return f"rho={self.rho}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, normalize={self.normalize!r}"
