"""`disalign-train`: one command, a subcommand per task.

Each task module exposes ``add_arguments(parser)`` and ``run(args) -> int``; only the task named on
the command line is imported (``disalign-train --help`` imports none). Works the same under
``torchrun --nproc_per_node=N -m disalign_train.cli ...`` (or the console script). Mistakes in the
command line or the data print one line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core.args import HelpFormatter
from .core.errors import UserError

TASKS = {
    "classify": ("disalign_train.classification.train", "long-tail image classification (digits-lt or ImageNet-LT-style split files)"),
    "segment": ("disalign_train.segmentation.train", "semantic segmentation (scenes-lt or an ADE20K-style folder)"),
    "detect": ("disalign_train.detection.train", "object detection (scenes-lt or COCO/LVIS-style JSON)"),
}


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of ``task`` only (the others show their one-line summary)."""
    parser = argparse.ArgumentParser(prog="disalign-train", description="Two-stage DisAlign training and evaluation.",
                                     formatter_class=HelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for name, (module_name, summary) in TASKS.items():
        if name != task:
            tasks.add_parser(name, help=summary, add_help=False)
            continue
        module = importlib.import_module(module_name)
        sub = tasks.add_parser(name, help=summary, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(task if task in TASKS else None).parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        if getattr(args, "debug", False):
            raise
        print(f"disalign-train {args.task}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
