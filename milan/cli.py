"""The ``milan`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser, command)`` and ``run(args) -> int``
(``command`` lets one module serve several subcommands); the module is imported only when its subcommand runs,
so ``milan --help`` stays fast.

Errors a user can fix (a bad config value, a missing or unwritable file, a damaged checkpoint, a missing GPU) are
printed as one line, ``milan: error: ...``, with exit status 2 for a usage error and 1 for a failure;
``milan --traceback ...`` (or ``MILAN_TRACEBACK=1``) shows the full traceback instead (:mod:`milan.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import warnings
from collections.abc import Sequence

from milan.errors import TRACEBACK_ENV, UserError, traceback_requested

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("milan.jobs.pretrain", "MILAN pretraining from a YAML config plus key=value overrides"),
    "linprobe": ("milan.jobs.linprobe", "linear probe of a pretrained encoder (BN + linear head, LARS)"),
    "finetune": ("milan.jobs.finetune", "end-to-end fine-tuning with layer-wise lr decay"),
    "knn": ("milan.jobs.knn", "weighted k-NN evaluation on frozen features"),
    "evaluate": ("milan.jobs.evaluate", "top-1/top-5 of a classifier checkpoint on a validation folder"),
    "export": ("milan.jobs.export", "export the encoder for timm / Hugging Face"),
    "convert": ("milan.jobs.export", "convert checkpoints between formats"),
    "inspect": ("milan.jobs.export", "print a checkpoint's format, architecture and keys"),
    "visualize": ("milan.jobs.visualize", "teacher attention, mask, prediction/target similarity, PCA views"),
    "plot": ("milan.jobs.plot", "loss, lr and throughput curves of a run"),
    "config": ("milan.jobs.config", "every config key of a job: type, default (or a preset's value), description"),
    "models": ("milan.jobs.models", "the model names with their encoder, decoder and teacher parameter counts"),
}

EPILOG = (
    "presets install with the package: --config demo_cpu (or pretrain/demo_cpu, configs/pretrain/demo_cpu.yaml) "
    "works from any folder; `milan config` lists them. Errors you can fix are one line (exit 2: usage, 1: failure); "
    f"--traceback or {TRACEBACK_ENV}=1 shows the full traceback."
)


def version_line() -> str:
    """``milan-pretrain X (torch Y, timm Z, Python W)``."""
    from milan import __version__

    parts = []
    for name in ("torch", "timm"):
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:  # pragma: no cover - both are dependencies
            parts.append(f"{name} missing")
    return f"milan-pretrain {__version__} ({', '.join(parts)}, Python {platform.python_version()})"


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """Warnings of milan's own categories as one line without the source location; others as Python prints them."""
    if category.__module__.startswith("milan."):
        return f"milan: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``milan`` CLI; user-fixable errors become one line and a non-zero exit status."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        argv.remove("--traceback")
        os.environ[TRACEBACK_ENV] = "1"  # also read by the jobs, and inherited by the processes they start
    parser = argparse.ArgumentParser(
        prog="milan", description="MILAN pretraining, evaluation and export.", epilog=EPILOG
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--traceback", action="store_true", help=f"full tracebacks on errors (or {TRACEBACK_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # its package is not part of this install
            continue
        available[name] = sub.add_parser(name, help=help_text, description=help_text)
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"milan: unknown command {argv[0]!r}; choose from {', '.join(available)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
        module.add_arguments(available[name], name)
        args = _parse(parser, available[name], argv)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if traceback_requested():
            raise
        print("milan: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = user_error_code(e)
        if code is None or traceback_requested():
            raise  # a bug: its traceback is what a report needs
        print(f"milan: error: {one_line(e)}", file=sys.stderr)
        return code


def _parse(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses ``argv``; ``KEY=VALUE`` words after an option join the command's positional list.

    argparse fills a ``nargs="*"`` positional from one run of words only, so ``milan config pretrain --config demo_cpu
    optim.blr=3e-4`` or ``milan pretrain a=1 --config X b=2`` would stop at the second run.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = next((n for n in ("overrides", "words") if isinstance(getattr(args, n, None), list)), None)
        if target is None or any(word.startswith("-") for word in extra):
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, target).extend(extra)
    return args


def user_error_code(error: BaseException) -> int | None:
    """The exit status for an error the user can fix (2: usage, 1: failure), ``None`` for anything else.

    User-fixable: :class:`~milan.errors.UserError` (config errors among them), checkpoint errors, and operating-system
    errors (a missing file, a folder that cannot be written, a full disk).
    """
    if isinstance(error, UserError):
        return error.exit_code
    from milan.checkpoint.io import CheckpointError  # local import: light, but not needed by every command

    if isinstance(error, (CheckpointError, OSError)):
        return 1
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OS error as ``what: path``)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
        if error.filename2 is not None:
            text += f" -> {error.filename2}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
