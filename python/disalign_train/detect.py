"""Long-tail detection: a two-stage DisAlign Fast R-CNN-style detector on scenes-lt (or COCO/LVIS-style data).

Work in progress: the full trainer replaces this entry point shortly.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/detect", help="output folder")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("disalign-train detect is being written")
