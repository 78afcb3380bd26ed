"""Detection building blocks in plain PyTorch (there is no torchvision here): boxes, RoIAlign, NMS, anchors.

Boxes are (N, 4) float tensors ``x0, y0, x1, y1`` in image pixels, the COCO/Detectron2 convention
where a box covering pixels 0..w-1 is ``[0, w]`` wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union of every box in ``a`` with every box in ``b`` (0 for empty unions)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))


class BoxCoder:
    """Fast R-CNN box deltas (dx, dy, dw, dh) scaled by ``weights``, as in Detectron2's Box2BoxTransform."""

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), max_log_scale: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.max_log_scale = max_log_scale  # keeps exp(dw) finite for wild predictions

    @staticmethod
    def _centre_size(boxes: torch.Tensor):
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights

    def encode(self, proposals: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that move each proposal onto its target box (both (N, 4), positive sizes)."""
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = self._centre_size(proposals)
        tx, ty, tw, th = self._centre_size(targets)
        return torch.stack(
            [wx * (tx - px) / pw, wy * (ty - py) / ph, ww * torch.log(tw / pw), wh * torch.log(th / ph)], dim=1
        )

    def decode(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Boxes from deltas (N, 4*k) applied to proposals (N, 4); returns (N, 4*k)."""
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = (t[:, None] for t in self._centre_size(proposals))
        dx, dy, dw, dh = (deltas[:, i::4] for i in range(4))
        dw = (dw / ww).clamp(max=self.max_log_scale)
        dh = (dh / wh).clamp(max=self.max_log_scale)
        cx = px + dx / wx * pw
        cy = py + dy / wy * ph
        half_w = 0.5 * pw * torch.exp(dw)
        half_h = 0.5 * ph * torch.exp(dh)
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=2)
        return boxes.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clips (N, 4*k) boxes to the image."""
    limits = boxes.new_tensor([width, height, width, height]).repeat(boxes.shape[1] // 4)
    return torch.minimum(boxes.clamp(min=0), limits)


def roi_align(
    features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 2
) -> torch.Tensor:
    """RoIAlign (He et al., Mask R-CNN; torchvision's ``aligned=True``) by bilinear sampling with grid_sample.

    ``features`` (B, C, H, W); ``rois`` (R, 5) = (image index, x0, y0, x1, y1) in image pixels;
    ``spatial_scale`` = feature size / image size. Each of the ``output_size`` x ``output_size`` bins
    averages ``sampling_ratio`` x ``sampling_ratio`` evenly spaced bilinear samples. Feature cell
    (i, j) is centred on image point ((j + 0.5) / scale, (i + 0.5) / scale). Samples outside the map
    read the nearest border value (torchvision returns 0 more than one cell outside). Returns
    (R, C, output_size, output_size), differentiable with respect to ``features``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5) rows of (image index, x0, y0, x1, y1), got shape {tuple(rois.shape)}")
    _, channels, height, width = features.shape
    if rois.shape[0] == 0:
        return features.new_zeros(0, channels, output_size, output_size)
    samples = output_size * sampling_ratio
    boxes = rois[:, 1:].to(features.dtype) * spatial_scale - 0.5  # into feature-cell coordinates
    fractions = (torch.arange(samples, device=features.device, dtype=features.dtype) + 0.5) / samples
    xs = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * fractions  # (R, samples)
    ys = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * fractions
    # grid_sample(align_corners=False) reads cell coordinate x at normalised (2x + 1) / W - 1.
    grid_x = ((2 * xs + 1) / width - 1)[:, None, :].expand(-1, samples, -1)
    grid_y = ((2 * ys + 1) / height - 1)[:, :, None].expand(-1, -1, samples)
    grid = torch.stack([grid_x, grid_y], dim=3)  # (R, samples, samples, 2)

    # One grid_sample call for the whole batch: image b samples the RoIs it owns, stacked vertically
    # (padded to the busiest image's count), so pooling windows never straddle two RoIs.
    batch = features.shape[0]
    image_index = rois[:, 0].long()
    counts = torch.bincount(image_index, minlength=batch)
    order = torch.argsort(image_index, stable=True)
    slot = torch.empty_like(image_index)  # each RoI's position among its image's RoIs
    slot[order] = torch.arange(len(order), device=rois.device) - (torch.cumsum(counts, 0) - counts)[image_index[order]]
    slots = int(counts.max())
    padded = grid.new_zeros(batch, slots, samples, samples, 2)
    padded[image_index, slot] = grid
    values = F.grid_sample(
        features, padded.view(batch, slots * samples, samples, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    if sampling_ratio > 1:
        values = F.avg_pool2d(values, sampling_ratio)
    values = values.view(batch, channels, slots, output_size, output_size).transpose(1, 2)
    values = values.reshape(batch * slots, channels, output_size, output_size)
    rows = image_index * slots + slot
    if len(rows) == len(values) and bool((rows[1:] > rows[:-1]).all()):
        return values  # every image has the same RoI count, in image order (inference): nothing to pick
    return values.index_select(0, rows)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first (at most ``max_keep``).

    Each round keeps the best remaining box and drops the remaining boxes that overlap it by more
    than ``iou_threshold``, so the loop runs once per kept box.
    """
    remaining = torch.argsort(scores, descending=True)
    keep = []
    while remaining.numel() and (max_keep is None or len(keep) < max_keep):
        best, remaining = remaining[0], remaining[1:]
        keep.append(best)
        overlaps = box_iou(boxes[best].unsqueeze(0), boxes[remaining]).squeeze(0)
        remaining = remaining[overlaps <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float, max_keep: int | None = None
) -> torch.Tensor:
    """Per-class NMS in one pass: boxes of different classes are moved apart so that they never overlap."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offsets = classes.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_keep)


def dense_anchors(height: int, width: int, stride: int, sizes, aspect_ratios) -> torch.Tensor:
    """Sliding-window boxes: one per (position, size, aspect ratio), centred every ``stride`` pixels, clipped.

    ``aspect_ratios`` are height / width; each anchor keeps the area ``size**2``.
    """
    shapes = torch.tensor(
        [[size / math.sqrt(ratio), size * math.sqrt(ratio)] for size in sizes for ratio in aspect_ratios]
    )
    centres_y, centres_x = torch.meshgrid(
        torch.arange(stride / 2, height, stride, dtype=torch.float32),
        torch.arange(stride / 2, width, stride, dtype=torch.float32),
        indexing="ij",
    )
    centres = torch.stack([centres_x, centres_y], dim=-1).reshape(-1, 1, 2)
    half = shapes.reshape(1, -1, 2) / 2
    anchors = torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)
    anchors = clip_boxes(anchors, height, width)
    keep = (anchors[:, 2] - anchors[:, 0] >= 2) & (anchors[:, 3] - anchors[:, 1] >= 2)
    return torch.unique(anchors[keep], dim=0)  # clipping makes border anchors coincide
