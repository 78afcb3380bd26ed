"""`disalign-train`: one command, a subcommand per task.

Each task module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Works the same under
``torchrun --nproc_per_node=N -m disalign_train.cli ...`` (or the console script).
"""

from __future__ import annotations

import argparse
import importlib

TASKS = {
    "classify": "disalign_train.classify",
    "segment": "disalign_train.segment",
    "detect": "disalign_train.detect",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disalign-train", description="Two-stage DisAlign training and evaluation.")
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, module_name in TASKS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().splitlines()[0]
        task = tasks.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(task)
        task.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
