"""Semantic segmentation on scenes-lt or ADE20K-style data: FCN stage 1, DisAlign stage 2 (work in progress)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/scenes-lt-segment", help="output folder")


def run(args) -> int:
    raise SystemExit("disalign-train segment: not implemented yet")
