"""COCO-style box AP with pycocotools, overall and by LVIS frequency group (rare / common / frequent).

LVIS (Gupta et al. 2019) groups categories by the number of TRAINING IMAGES that contain them:
rare 1-10 (a category never seen in training is rarer still), common 11-100, frequent > 100. On a
data set too small to fill all three groups that way the rule falls back to terciles of the ranked
image counts (core.groups), like the other tasks. A category's AP is COCOeval's precision array
(IoU 0.50:0.95 x 101 recall points, area "all", the largest maxDets) averaged over its defined
entries; ``ap`` is the mean over categories that have test ground truth, and ``rare_ap`` /
``common_ap`` / ``frequent_ap`` the means over those categories of each group (LVIS's own
evaluator averages the same way); None where a group has no evaluated category.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..core.errors import UserError
from ..core.groups import GroupRule

GROUPS = ("frequent", "common", "rare")
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
METRICS = ["ap", "frequent_ap", "common_ap", "rare_ap"]
TAIL_METRIC = "rare_ap"
LVIS_LETTER = {"rare": "r", "common": "c", "frequent": "f"}


def lvis_group(num_train_images: int) -> str:
    """LVIS frequency group of a category seen in ``num_train_images`` training images."""
    if num_train_images <= RARE_MAX_IMAGES:
        return "rare"
    return "common" if num_train_images <= COMMON_MAX_IMAGES else "frequent"


RULE = GroupRule(GROUPS, lambda counts: [lvis_group(int(n)) for n in counts],
                 "LVIS: rare 1-10 training images, common 11-100, frequent > 100", "training images")


def load_ground_truth(json_path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        return COCO(str(json_path))


def category_ids_by_name(coco: COCO, class_names) -> list[int]:
    """The COCO category id of each class name, in the detector's label order."""
    ids = {cat["name"]: cat["id"] for cat in coco.loadCats(coco.getCatIds())}
    missing = [name for name in class_names if name not in ids]
    if missing:
        raise UserError(f"class names {missing} are not categories of the ground truth {sorted(ids)}")
    return [ids[name] for name in class_names]


def per_category_ap(coco: COCO, detections: list[dict], max_detections: int = 100) -> dict[int, float]:
    """AP (IoU 0.50:0.95) of every category id that has ground truth; detections in COCO result format."""
    with_ground_truth = [c for c in coco.getCatIds() if coco.getAnnIds(catIds=[c])]
    if not detections:
        return {c: 0.0 for c in with_ground_truth}
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes(detections)
        evaluation = COCOeval(coco, results, iouType="bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, category) at area "all"
    aps = {}
    for k, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]  # -1 marks categories without ground truth
        if values.size:
            aps[category_id] = float(values.mean())
    return aps


def grouped_ap(category_ap: dict[int, float], groups: dict[int, str]) -> dict[str, float | None]:
    """``ap`` and ``<group>_ap``: means of per-category AP over all / each group's categories."""
    summary = {"ap": float(np.mean(list(category_ap.values()))) if category_ap else None}
    for group in GROUPS:
        values = [ap for c, ap in category_ap.items() if groups[c] == group]
        summary[f"{group}_ap"] = float(np.mean(values)) if values else None
    return summary
