"""The ``milan`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser, command)`` and ``run(args) -> int``
(``command`` lets one module serve several subcommands); the module is imported only when its subcommand runs,
so ``milan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("milan.engine.pretrain", "MILAN pretraining from a YAML config plus key=value overrides"),
    "linprobe": ("milan.engine.linprobe", "linear probe of a pretrained encoder (BN + linear head, LARS)"),
    "finetune": ("milan.engine.finetune", "end-to-end fine-tuning with layer-wise lr decay"),
    "knn": ("milan.engine.knn", "weighted k-NN evaluation on frozen features"),
    "evaluate": ("milan.engine.evaluate", "top-1/top-5 of a classifier checkpoint on a validation folder"),
    "export": ("milan.checkpoint.cli", "export the encoder for timm / Hugging Face"),
    "convert": ("milan.checkpoint.cli", "convert checkpoints between formats"),
    "inspect": ("milan.checkpoint.cli", "print a checkpoint's format, architecture and keys"),
    "visualize": ("milan.viz.visualize", "teacher attention, mask, prediction/target similarity, PCA views"),
    "plot": ("milan.viz.plot", "loss, lr and throughput curves of a run"),
}


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """Warnings of milan's own categories as one line without the source location; others as Python prints them."""
    if category.__module__.startswith("milan."):
        return f"milan: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``milan`` CLI."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="milan", description="MILAN pretraining, evaluation and export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # its package is not part of this install
            continue
        available[name] = sub.add_parser(name, help=help_text, description=help_text)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"milan: unknown command {argv[0]!r}; choose from {', '.join(available)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    module.add_arguments(available[name], name)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
