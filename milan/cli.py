"""The ``milan`` command line: one entry point, one subcommand per job (:func:`milan.jobs.commands`).

A job's module is imported only when its command runs. This is the one place that turns errors into exit statuses:
an error the user can fix (:class:`~milan.errors.UserError`: a bad config value, a damaged checkpoint, unusable data,
a run folder in use, a full disk ...; a missing file; a folder that cannot be written) is one line, ``milan COMMAND:
error: ...``, with exit status 2 for a usage error and 1 for a failure; ``milan --traceback ...`` (or
``MILAN_TRACEBACK=1``) shows the full traceback instead. A run stopped by SIGTERM or SIGINT after saving exits with
128 + the signal number (143, 130).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings
from collections.abc import Sequence

from milan.errors import TRACEBACK_ENV, RunInterrupted, UserError, traceback_requested
from milan.jobs import commands

EPILOG = (
    "presets install with the package: --config demo_cpu (or pretrain/demo_cpu, configs/pretrain/demo_cpu.yaml) "
    "works from any folder; `milan config` lists them. Errors you can fix are one line (exit 2: usage, 1: failure); "
    f"--traceback or {TRACEBACK_ENV}=1 shows the full traceback."
)


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """Warnings of milan's own categories as one line without the source location; others as Python prints them."""
    if category.__module__.startswith("milan."):
        return f"milan: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``milan`` CLI; returns the exit status."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        argv.remove("--traceback")
        os.environ[TRACEBACK_ENV] = "1"  # also inherited by the processes a job starts
    parser = argparse.ArgumentParser(
        prog="milan", description="MILAN pretraining, evaluation and export.", epilog=EPILOG
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--traceback", action="store_true", help=f"full tracebacks on errors (or {TRACEBACK_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = commands()
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in available.items()}
    if argv[:1] in (["--version"], ["-V"]):
        from milan import __version__

        parts = [f"{name} {importlib.import_module(name).__version__}" for name in ("torch", "timm")]
        print(f"milan-pretrain {__version__} ({', '.join(parts)}, Python {platform.python_version()})")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in available:
        parser.print_usage(sys.stderr)
        print(f"milan: unknown command {name!r}; choose from {', '.join(available)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(available[name][0])
        module.add_arguments(parsers[name], name)
        return int(module.run(_parse(parser, parsers[name], argv)) or 0)
    except RunInterrupted as e:  # the line saying what was saved is printed already
        return e.exit_status
    except KeyboardInterrupt:
        if traceback_requested():
            raise
        print(f"milan {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = user_error_code(e)
        if code is None or traceback_requested():
            raise  # a bug: its traceback is what a report needs
        print(f"milan {name}: error: {one_line(e)}", file=sys.stderr)
        return code


def _parse(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses ``argv``; ``KEY=VALUE`` words after an option join the command's positional list, in order.

    argparse fills a ``nargs="*"`` positional from one run of words only, so ``milan config pretrain --config demo_cpu
    optim.blr=3e-4`` or ``milan pretrain a=1 --resume auto b=2`` would stop at the second run.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = next((n for n in ("overrides", "words") if isinstance(getattr(args, n, None), list)), None)
        if target is None or any(word.startswith("-") for word in extra):
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, target).extend(extra)
    return args


def user_error_code(error: BaseException) -> int | None:
    """The exit status for an error the user can fix (2: usage, 1: failure), ``None`` for anything else (a bug).

    A :class:`~milan.errors.UserError` says its own; a missing file or folder named by the user is a usage error; any
    other operating-system error (a folder that cannot be written, a full disk) a failure.
    """
    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return 2
    return 1 if isinstance(error, OSError) else None


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
