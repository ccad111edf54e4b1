"""Command-line plumbing shared by the jobs (``milan pretrain``, ``linprobe``, ``finetune``, ``knn``).

``--resume`` rebuilds a run from the config stored in its checkpoint (:func:`resume_config`); ``--config`` is then
optional, and ``KEY=VALUE`` overrides, accepted before or after the options, apply on top and are printed as changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from milan.checkpoint.io import CheckpointError
from milan.data import DataError
from milan.errors import traceback_requested
from milan.train.checkpointing import Checkpointer, CheckpointWriteError, load_training_checkpoint
from milan.train.config import ConfigError, load_config, parse_overrides, to_dict, to_yaml, update
from milan.train.loop import NonFiniteLossError, RunInterrupted
from milan.train.run import RunFolderError, usable_checkpoint

C = TypeVar("C")

RESUME_HELP = (
    "continue a run with the config stored in its checkpoint: --config is then optional, and KEY=VALUE overrides "
    "apply on top (printed as 'key: old -> new'). 'auto': the newest valid checkpoint in out_dir (out_dir=DIR, else "
    "--config's out_dir, else the default; a damaged newest file is skipped with a note), or a new run there if it "
    "has no checkpoint (with --config, or the folder's config.yaml); RUN_DIR: the same in that folder; FILE: that "
    "checkpoint, continued in the run folder holding it (or out_dir=DIR). A finished run exits at once and changes "
    "no file"
)


def add_run_arguments(
    parser: argparse.ArgumentParser,
    example: str,
    *,
    resume: bool = True,
    overrides_example: str = "encoder.pretrained=runs/demo/checkpoints/last.pt batch_size=64",
) -> None:
    """``--config FILE``, ``KEY=VALUE`` overrides (anywhere on the line), ``--resume`` and ``--print-config``.

    Args:
        parser: The subcommand's parser.
        example: A preset named in the ``--config`` help.
        resume: Add ``--resume auto|RUN_DIR|FILE``.
        overrides_example: Overrides named in their help.
    """
    optional = " (optional with --resume: the run's own config is used)" if resume else ""
    parser.add_argument("--config", "-c", metavar="FILE", help=f"YAML preset, e.g. {example}{optional}")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted config overrides, e.g. {overrides_example}"
    )
    if resume:
        parser.add_argument("--resume", metavar="auto|RUN_DIR|FILE", help=RESUME_HELP)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _overrides_anywhere(parser)


def _overrides_anywhere(parser: argparse.ArgumentParser) -> None:
    """Lets ``KEY=VALUE`` overrides also follow options (``a=1 --resume auto b=2``).

    argparse fills a ``nargs="*"`` positional from one stretch of the line only and calls the rest unrecognised;
    here those ``KEY=VALUE`` leftovers join ``overrides``, in order.
    """
    parse = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = parse(args, namespace)
        late = [e for e in extras if "=" in e and not e.startswith("-")]
        if late:
            ns.overrides = [*(ns.overrides or []), *late]
            extras = [e for e in extras if not ("=" in e and not e.startswith("-"))]
        return ns, extras

    setattr(parser, "parse_known_args", parse_known_args)  # noqa: B010 - the subparser action calls this instance's


@dataclasses.dataclass(frozen=True)
class Resumed(Generic[C]):
    """What :func:`resume_config` decided.

    Attributes:
        config: The run's config (its checkpoint's, with the overrides on top; ``out_dir`` is the run folder).
        resume: What the job gets: the checkpoint file, or ``"auto"`` (a new run in a folder without checkpoints).
        notes: Lines to print (the checkpoint used, the changed values, skipped files).
    """

    config: C
    resume: str
    notes: list[str]


def resume_config(cls: type[C], resume: str, config: str | None = None, overrides: Sequence[str] = ()) -> Resumed[C]:
    """The config of a run to resume: the one stored in its checkpoint, with ``overrides`` on top.

    Args:
        cls: The job's config class.
        resume: ``"auto"`` (the newest valid checkpoint in ``out_dir``: from an ``out_dir=`` override, else from
            ``config``, else the default), a run folder (the same there) or a checkpoint file (continued in the run
            folder that holds it, i.e. the parent of its ``checkpoints/`` folder, unless ``out_dir=`` is given).
        config: A config file: with a checkpoint it only supplies ``out_dir`` for ``"auto"`` (values that differ
            from the stored config are named in a note and not used); without one (a folder with no checkpoint yet)
            it is the new run's config.
        overrides: ``KEY=VALUE`` strings applied on top (each change is a note ``key: old -> new``).

    Returns:
        The config, the resume argument for the job, and notes.

    Raises:
        ConfigError: A bad override, or nothing to build the config from.
        CheckpointError: ``resume`` is a file that is not a training checkpoint.
        RunFolderError: Every checkpoint in the folder is unusable.
        CheckpointWriteError: A checkpoint path is taken (e.g. a folder named ``last.pt``).
    """
    out_override = next((v for k, _, v in (o.partition("=") for o in overrides) if k.strip() == "out_dir"), None)
    path = Path(resume)
    notes: list[str] = []
    if resume != "auto" and not path.is_dir():  # a checkpoint file
        ckpt = load_training_checkpoint(path)
        in_run = path.parent.parent if path.parent.name == "checkpoints" else None
        run_dir = Path(out_override) if out_override else in_run or Path(str(ckpt["config"].get("out_dir", "")))
    else:
        if resume == "auto":
            default = load_config(cls, config).out_dir if config is not None else cls().out_dir  # type: ignore[attr-defined]
            run_dir = Path(out_override or default)
        else:
            run_dir = path
            if out_override and Path(out_override).resolve() != path.resolve():
                raise ConfigError(f"--resume {resume} and out_dir={out_override} name two different run folders")
        checkpointer = Checkpointer(run_dir)
        checkpointer.check_paths()  # e.g. a folder named last.pt: said before anything else
        found, skipped = usable_checkpoint(checkpointer, resume)
        if found is None:  # a new run in that folder, from --config or the folder's own config.yaml
            source = config if config is not None else run_dir / "config.yaml"
            if config is None and not Path(source).is_file():
                raise ConfigError(
                    f"--resume {resume}: {run_dir} has no checkpoint to resume and no config.yaml; pass --config FILE "
                    "to start a new run there"
                )
            cfg = dataclasses.replace(load_config(cls, source, overrides), out_dir=str(run_dir))  # type: ignore[type-var]
            return Resumed(cfg, "auto", notes)
        path, ckpt = found
        notes += [f"--resume: skipping unusable checkpoint {bad} ({why})" for bad, why in skipped]
    stored = ckpt["config"]
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{path} holds no config to resume from")
    base = _config_from(cls, stored, (), path)
    cfg = dataclasses.replace(_config_from(cls, stored, overrides, path), out_dir=str(run_dir))  # type: ignore[type-var]
    state = ckpt["state"]
    notes.append(
        f"resuming {run_dir} from {path} (epoch {state['epoch']}, step {state['step']}) with its stored config"
    )
    changes = _differences(base, cfg)
    if changes:
        notes.append("changed: " + ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()))
    if config is not None:
        ignored = list(_differences(base, load_config(cls, config)))
        if ignored:
            shown = ", ".join(ignored[:6]) + (f" and {len(ignored) - 6} more" if len(ignored) > 6 else "")
            notes.append(
                f"--config {config}: not used for the resumed run, whose own config differs in {shown}; pass "
                "KEY=VALUE to change a value"
            )
    return Resumed(cfg, str(path), notes)


def _config_from(cls: type[C], stored: Mapping[str, Any], overrides: Sequence[str], path: Path) -> C:
    """``cls`` from a checkpoint's plain-data config, with ``overrides`` on top."""
    stored = dict(stored)
    if isinstance(stored.get("model"), Mapping):  # model.restore_order: stored by older versions, no longer a key
        stored["model"] = {k: v for k, v in stored["model"].items() if k != "restore_order"}
    raw = _merge(stored, parse_overrides(overrides))
    try:
        factory = getattr(cls, "defaults_from", None)
        return update(factory(raw) if factory is not None else cls(), raw)
    except ConfigError as e:
        if overrides:
            raise
        raise ConfigError(f"the config stored in {path}: {e}") from e


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def _differences(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in a, value in b)}`` where two configs differ (``out_dir`` left out)."""
    fa, fb = _flat(to_dict(a)), _flat(to_dict(b))
    keys = [k for k in [*fa, *(k for k in fb if k not in fa)] if k != "out_dir"]
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _is_main_launch() -> bool:
    """Whether this is the process that prints (rank 0 of a torchrun launch; before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def run_job(
    name: str,
    cls: type[C],
    check: Callable[[C], None],
    job: Callable[[C, argparse.Namespace], Any],
    args: argparse.Namespace,
) -> int:
    """Loads and checks the config (``--resume``: the run's own), then runs the job; one-line errors and exit codes.

    A run folder in use or unwritable, or a checkpoint that could not be written (no space left), exits 1; a run
    stopped by SIGTERM or SIGINT after saving exits 128 + the signal number (143, 130); a finished run resumed
    exits 0.

    Args:
        name: The subcommand (message prefix ``milan NAME:``).
        cls: The config dataclass.
        check: Its value checks.
        job: ``(config, args) -> anything``: runs the job (``args.resume`` is then the checkpoint to resume from,
            or ``"auto"``).
        args: Parsed arguments (``config``, ``overrides``, ``print_config``, optionally ``resume``).

    Returns:
        0 on success, 2 for a config/checkpoint/data-source error, 1 for a non-finite loss or unusable data
        (:class:`~milan.data.DataError`: no usable image, too many skipped).
    """
    try:
        cfg = _job_config(cls, args)
        check(cfg)
    except ConfigError as e:
        if traceback_requested():  # milan --traceback / MILAN_TRACEBACK=1
            raise
        print(f"milan {name}: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # --resume FILE that is not a training checkpoint
        print(f"milan {name}: {e}", file=sys.stderr)
        return 2
    except (RunFolderError, CheckpointWriteError) as e:
        print(f"milan {name}: {e}", file=sys.stderr)
        return 1
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        job(cfg, args)
    except RunInterrupted as e:  # the line saying what was saved is already printed
        return e.exit_status
    except KeyboardInterrupt:
        print(
            f"milan {name}: interrupted outside the training steps; the checkpoints written are intact", file=sys.stderr
        )
        return 128 + signal.SIGINT
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
    except (RunFolderError, CheckpointWriteError) as e:  # in use, unwritable, no space left
        print(f"milan {name}: {e}", file=sys.stderr)
        return 1
    return 0


def _job_config(cls: type[C], args: argparse.Namespace) -> C:
    """The job's config: ``--config`` and overrides, or with ``--resume`` the run's own (:func:`resume_config`).

    The resume notes are printed (to stderr with ``--print-config``, which prints the config alone on stdout).
    """
    if not getattr(args, "resume", None):
        return load_config(cls, args.config, args.overrides)
    resumed = resume_config(cls, args.resume, args.config, args.overrides)
    args.resume = resumed.resume
    if _is_main_launch():
        for line in resumed.notes:
            print(line, file=sys.stderr if args.print_config else sys.stdout, flush=True)
    return resumed.config
