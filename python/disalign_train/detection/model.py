"""A small Fast R-CNN-style detector on torchvision.ops: conv backbone, RoIAlign box head with K+1
logits (background last) and class-specific box regression, plus its proposals, RoI sampling,
losses and post-processing.

Proposals. Training RoIs are the ground-truth boxes, jittered copies of them (shifted by up to a
quarter of their size, scaled by up to ~1.35x) and random sliding-window anchors, labelled by their
best IoU with the ground truth (>= 0.5 foreground, else background) and sampled with at most a
quarter foreground, as in Fast R-CNN. At inference the proposals never look at ground truth: every
image gets the same dense set of sliding-window anchors (every ``anchor_stride`` pixels, each
``anchor_sizes`` x ``anchor_ratios``), the box head scores and regresses all of them, and per-class
NMS keeps the best. The anchors are also among the training RoIs, so the background class has
seen exactly the boxes it must reject at test time.

Boxes are (N, 4) ``x0, y0, x1, y1`` in image pixels (a box covering pixels 0..w-1 is ``[0, w]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder as _TorchvisionBoxCoder
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


@dataclass
class DetectorConfig:
    num_classes: int  # K foreground categories; the box head has K + 1 logits, background last
    image_size: int = 64
    width: int = 32  # backbone channels at stride 2 (half at full resolution, double at stride 4)
    hidden: int = 256  # box head fully connected width
    roi_size: int = 7
    roi_sampling_ratio: int = 1  # bins are under one feature cell wide here: their centre sample suffices
    anchor_stride: int = 4
    anchor_sizes: tuple = (9, 14, 21)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    rois_per_image: int = 48
    foreground_fraction: float = 0.25
    jitters_per_box: int = 8
    foreground_iou: float = 0.5
    score_threshold: float = 1e-3  # LVIS evaluates with a very low threshold (paper: 1e-4)
    candidates_per_image: int = 1000  # before NMS
    nms_iou: float = 0.5
    detections_per_image: int = 100


class BoxCoder(_TorchvisionBoxCoder):
    """Fast R-CNN deltas (dx, dy, dw, dh) with weights (10, 10, 5, 5), torchvision's coder:
    ``encode(proposals, targets)`` and ``decode(deltas (N, 4k), proposals (N, 4)) -> (N, 4k)``."""

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), max_log_scale: float = math.log(1000.0 / 16)):
        super().__init__(weights, bbox_xform_clip=max_log_scale)

    def encode(self, proposals: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.encode_single(targets, proposals)

    def decode(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.decode_single(deltas, proposals).reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clips (N, 4*k) boxes to the image (torchvision's clip on each group of 4)."""
    return clip_boxes_to_image(boxes.reshape(-1, 4), (height, width)).reshape(boxes.shape)


def dense_anchors(height: int, width: int, stride: int, sizes, aspect_ratios) -> torch.Tensor:
    """Sliding-window boxes: one per (position, size, aspect ratio), centred every ``stride`` pixels, clipped,
    duplicates from the clipping removed. ``aspect_ratios`` are height / width; each anchor has area ``size**2``."""
    shapes = torch.tensor([[size / math.sqrt(ratio), size * math.sqrt(ratio)] for size in sizes for ratio in aspect_ratios])
    centres_y, centres_x = torch.meshgrid(
        torch.arange(stride / 2, height, stride, dtype=torch.float32),
        torch.arange(stride / 2, width, stride, dtype=torch.float32),
        indexing="ij",
    )
    centres = torch.stack([centres_x, centres_y], dim=-1).reshape(-1, 1, 2)
    half = shapes.reshape(1, -1, 2) / 2
    anchors = clip_boxes(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4), height, width)
    keep = (anchors[:, 2] - anchors[:, 0] >= 2) & (anchors[:, 3] - anchors[:, 1] >= 2)
    return torch.unique(anchors[keep], dim=0)


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class Detector(nn.Module):
    """Backbone (stride 4) + RoIAlign box head. ``cls_score`` is the (K+1)-way classifier that stage 2 calibrates."""

    stride = 4

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        w = config.width
        # Full resolution only for the first layer (textures have a 3-pixel period); receptive field 17 pixels.
        self.backbone = nn.Sequential(
            _conv(3, w // 2), _conv(w // 2, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w), nn.Conv2d(2 * w, w, 1)
        )
        self.box_head = nn.Sequential(
            nn.Flatten(), nn.Linear(w * config.roi_size**2, config.hidden), nn.ReLU(inplace=True),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True),
        )
        self.cls_score = nn.Linear(config.hidden, config.num_classes + 1)
        self.bbox_pred = nn.Linear(config.hidden, 4 * config.num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def roi_features(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Box head features (R, hidden) of ``rois`` (R, 5) = (image index, x0, y0, x1, y1) on uint8 ``images``."""
        x = (images.float() / 255 - PIXEL_MEAN) / PIXEL_STD
        pooled = roi_align(self.backbone(x), rois, self.config.roi_size, 1.0 / self.stride,
                           self.config.roi_sampling_ratio, aligned=True)
        return self.box_head(pooled)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K+1 class logits, 4K box deltas) of every RoI."""
        features = self.roi_features(images, rois)
        return self.cls_score(features), self.bbox_pred(features)




def inference_proposals(config: DetectorConfig, device=None) -> torch.Tensor:
    """The ground-truth-free proposals of every image: dense sliding-window anchors."""
    size = config.image_size
    return dense_anchors(size, size, config.anchor_stride, config.anchor_sizes, config.anchor_ratios).to(device)


def jitter_boxes(boxes: torch.Tensor, copies: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``copies`` randomly shifted and rescaled versions of every box, (M * copies, 4)."""
    boxes = boxes.repeat_interleave(copies, dim=0)
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    noise = torch.rand(boxes.shape[0], 4, generator=generator).to(boxes.device) * 2 - 1
    centre = centre + 0.25 * size * noise[:, :2]
    size = size * torch.exp(0.3 * noise[:, 2:])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def label_proposals(proposals, gt_boxes, gt_labels, num_classes: int, foreground_iou: float):
    """(class label per proposal, background = K; index of its best ground-truth box)."""
    if gt_boxes.numel() == 0:
        background = torch.full((len(proposals),), num_classes, dtype=torch.long, device=proposals.device)
        return background, torch.zeros_like(background)
    best_iou, best_gt = box_iou(proposals, gt_boxes).max(dim=1)
    labels = torch.where(best_iou >= foreground_iou, gt_labels[best_gt], torch.full_like(best_gt, num_classes))
    return labels, best_gt


def sample_training_rois(config: DetectorConfig, gt_boxes, gt_labels, anchors, generator=None):
    """One image's training RoIs (R, 4), class labels (R,) and box regression targets (R, 4)."""
    size = config.image_size
    candidates = torch.cat([
        gt_boxes,
        clip_boxes(jitter_boxes(gt_boxes, config.jitters_per_box, generator), size, size),
        anchors[torch.randint(len(anchors), (config.rois_per_image,), generator=generator).to(anchors.device)],
    ])
    candidates = candidates[(candidates[:, 2:] - candidates[:, :2]).min(dim=1).values >= 1]
    labels, matched = label_proposals(candidates, gt_boxes, gt_labels, config.num_classes, config.foreground_iou)
    foreground = torch.nonzero(labels < config.num_classes).squeeze(1)
    background = torch.nonzero(labels == config.num_classes).squeeze(1)
    num_foreground = min(len(foreground), int(config.rois_per_image * config.foreground_fraction))
    num_background = min(len(background), config.rois_per_image - num_foreground)
    pick = lambda idx, n: idx[torch.randperm(len(idx), generator=generator)[:n].to(idx.device)]  # noqa: E731
    keep = torch.cat([pick(foreground, num_foreground), pick(background, num_background)])
    rois, labels = candidates[keep], labels[keep]
    targets = BoxCoder().encode(rois, gt_boxes[matched[keep]]) if len(gt_boxes) else torch.zeros_like(rois)
    return rois, labels, targets


def box_regression_loss(deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """L1 loss of the foreground RoIs' own-class deltas, averaged over all RoIs (Detectron2's normalisation)."""
    foreground = torch.nonzero(labels < num_classes).squeeze(1)
    own_class = deltas.view(len(deltas), num_classes, 4)[foreground, labels[foreground]]
    return F.l1_loss(own_class, targets[foreground], reduction="sum") / max(len(labels), 1)


def postprocess(config: DetectorConfig, probabilities, class_boxes):
    """Detections of one image from (R, K+1) class probabilities and (R, 4K) class-specific boxes.

    Every (RoI, foreground class) pair above the score threshold is a candidate; the best
    ``candidates_per_image`` go through per-class NMS (torchvision's batched_nms) and the best
    ``detections_per_image`` stay. Returns (boxes (D, 4), scores (D,), labels (D,)).
    """
    num_classes = config.num_classes
    scores = probabilities[:, :num_classes]
    roi, label = torch.nonzero(scores > config.score_threshold, as_tuple=True)
    candidate_scores = scores[roi, label]
    top = torch.argsort(candidate_scores, descending=True)[: config.candidates_per_image]
    roi, label, candidate_scores = roi[top], label[top], candidate_scores[top]
    boxes = class_boxes.view(len(class_boxes), num_classes, 4)[roi, label]
    keep = batched_nms(boxes, candidate_scores, label, config.nms_iou)[: config.detections_per_image]
    return boxes[keep], candidate_scores[keep], label[keep]
