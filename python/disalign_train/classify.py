"""Long-tail classification: two-stage DisAlign (joint training, then calibration) with the paper's baselines.

Work in progress: the full trainer replaces this entry point shortly.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/classify", help="output folder")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("disalign-train classify is being written")
