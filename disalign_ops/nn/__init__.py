"""nn.Module heads that turn a trained classifier into a DisAlign head (paper sec. 3.2), and their loss.

``heads``: the DisAlign heads (linear, 1x1 conv, detector ROI) and the uncalibrated ``ClassifierHead``
with the same interface; ``cosine``: the cosine classifier; ``loss``: ``DisAlignLoss``.
"""

from .cosine import CosineLinear
from .heads import (
    CONFIDENCE_INPUTS,
    CONFIDENCE_LAYERS,
    INITS,
    CalibrationInputs,
    ClassifierHead,
    DisAlignConv2d,
    DisAlignLinear,
    DisAlignROIHead,
)
from .loss import NORMALIZATIONS, DisAlignLoss

__all__ = [
    "CalibrationInputs", "ClassifierHead", "CosineLinear", "DisAlignConv2d", "DisAlignLinear", "DisAlignLoss",
    "DisAlignROIHead", "INITS", "CONFIDENCE_INPUTS", "CONFIDENCE_LAYERS", "NORMALIZATIONS",
]
