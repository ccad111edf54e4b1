"""Command-line plumbing shared by the jobs (``milan pretrain``, ``linprobe``, ``finetune``, ``knn``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from milan.checkpoint.io import CheckpointError
from milan.data import DataError
from milan.engine.config import ConfigError, load_config, to_yaml
from milan.engine.loop import NonFiniteLossError
from milan.errors import traceback_requested

C = TypeVar("C")


def add_run_arguments(
    parser: argparse.ArgumentParser,
    example: str,
    *,
    resume: bool = True,
    overrides_example: str = "encoder.pretrained=runs/demo/checkpoints/last.pt batch_size=64",
) -> None:
    """``--config FILE``, ``KEY=VALUE`` overrides, ``--resume auto|FILE`` and ``--print-config``.

    Args:
        parser: The subcommand's parser.
        example: A preset named in the ``--config`` help.
        resume: Add ``--resume``.
        overrides_example: Overrides named in their help.
    """
    parser.add_argument("--config", "-c", metavar="FILE", help=f"YAML preset, e.g. {example}")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted config overrides, e.g. {overrides_example}"
    )
    if resume:
        parser.add_argument(
            "--resume",
            metavar="auto|FILE",
            help="'auto': continue from the newest valid checkpoint in out_dir (or start there); or a checkpoint file",
        )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_job(
    name: str,
    cls: type[C],
    check: Callable[[C], None],
    job: Callable[[C, argparse.Namespace], Any],
    args: argparse.Namespace,
) -> int:
    """Loads and checks the config, then runs the job; clean one-line errors and exit codes.

    Args:
        name: The subcommand (message prefix ``milan NAME:``).
        cls: The config dataclass.
        check: Its value checks.
        job: ``(config, args) -> anything``: runs the job.
        args: Parsed arguments (``config``, ``overrides``, ``print_config``).

    Returns:
        0 on success, 2 for a config/checkpoint/data-source error, 1 for a non-finite loss or unusable data
        (:class:`~milan.data.DataError`: no usable image, too many skipped).
    """
    try:
        cfg = load_config(cls, args.config, args.overrides)
        check(cfg)
    except ConfigError as e:
        if traceback_requested():  # milan --traceback / MILAN_TRACEBACK=1
            raise
        print(f"milan {name}: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        job(cfg, args)
    except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError) as e:
        if traceback_requested():
            raise
        print(f"milan {name}: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DataError) as e:
        if traceback_requested():
            raise
        print(f"milan {name}: {e}", file=sys.stderr)
        return 1
    return 0
