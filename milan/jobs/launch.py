"""How the jobs get their options from the command line: the config jobs' config, the checkpoint readers' view flags.

The config jobs (``milan pretrain``, ``linprobe``, ``finetune``, ``segment``, ``knn``) take ``--config FILE`` and
``KEY=VALUE`` overrides (anywhere on the line, see :func:`milan.cli.main`), or with ``--resume`` the config stored in
the run's checkpoint (:func:`resume_config`): ``--config`` is then optional, and the overrides apply on top and are
printed as changes. Errors are raised (:class:`~milan.errors.UserError`); the command line prints them as one line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import operator
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from milan.errors import CheckpointError, ConfigError
from milan.train.checkpointing import Checkpointer, load_training_checkpoint
from milan.train.config import from_dict, load_config, to_dict, to_yaml

C = TypeVar("C")

# Keys that configs of older versions hold and this version no longer has, dropped when such a run resumes (a key is
# dropped only for a job whose schema lacks it: optim.betas stays with fine-tuning's AdamW). restore_order was a
# test-only switch; the others were accepted and ignored by the jobs that no longer take them (issue 12).
RETIRED_KEYS = (
    "model.restore_order",
    "log.plot",
    "data.crop_geometry",
    "data.draft",
    "optim.betas",
    "optim.eps",
    "optim.fused",
    "optim.wd_exempt_tokens",
    "runtime.channels_last",
    "runtime.compile",
    "runtime.compile_mode",
    "runtime.compile_teacher",
    "runtime.grad_checkpointing",
    "runtime.peak_tflops",
    "runtime.strategy",
    "runtime.teacher_dtype",
)

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
    """``--config FILE``, ``KEY=VALUE`` overrides, ``--resume auto|RUN_DIR|FILE`` (optional) and ``--print-config``."""
    optional = " (optional with --resume: the run's own config is used)" if resume else ""
    parser.add_argument("--config", "-c", metavar="FILE", help=f"YAML preset, e.g. {example}{optional}")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted config overrides, e.g. {overrides_example}"
    )
    if resume:
        parser.add_argument("--resume", metavar="auto|RUN_DIR|FILE", help=RESUME_HELP)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_view_arguments(
    parser: argparse.ArgumentParser,
    title: str = "evaluation view, for files that do not record it (default: the references')",
) -> None:
    """``--crop-pct``, ``--interpolation``, ``--mean``, ``--std``: the view of a file that does not record it."""
    g = parser.add_argument_group(title)
    g.add_argument("--crop-pct", type=float, help="center-crop fraction (0.875: resize 256, crop 224)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), help="resize resampling (bicubic)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean (ImageNet's)")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (ImageNet's)")


def view_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`milan.checkpoint.resolve_spec` that :func:`add_view_arguments` parsed."""
    return {
        "crop_pct": args.crop_pct,
        "interpolation": args.interpolation,
        "mean": tuple(args.mean) if args.mean else None,
        "std": tuple(args.std) if args.std else None,
    }


def print_warnings(command: str, *notes: str) -> None:
    """What a job assumed, one line each: ``milan COMMAND: warning: NOTE`` on stderr."""
    for note in notes:
        print(f"milan {command}: warning: {note}", file=sys.stderr)


def run_job(args: argparse.Namespace, cls: type[C], check: Callable[[C], None], job: Callable[..., object]) -> int:
    """Runs ``job(cfg)`` on the checked config: ``--config`` and overrides, or with ``--resume`` the run's own.

    The resume notes are printed (to stderr with ``--print-config``, which prints the config alone, on stdout, and runs
    nothing); a resumed job gets what it resumes from (the checkpoint file, or ``"auto"``) as ``resume``.
    """
    resume = getattr(args, "resume", None)
    if resume:
        cfg, resume, notes = resume_config(cls, resume, args.config, args.overrides)
        if os.environ.get("RANK", "0") == "0":  # before the process group exists: rank 0 of a torchrun launch
            for line in notes:
                print(line, file=sys.stderr if args.print_config else sys.stdout, flush=True)
    else:
        cfg = load_config(cls, args.config, args.overrides)
    check(cfg)
    if args.print_config:
        print(to_yaml(cfg), end="")
    elif resume is None:  # a new run (knn has no --resume)
        job(cfg)
    else:
        job(cfg, resume=resume)
    return 0


def resume_config(
    cls: type[C], resume: str, config: str | None = None, overrides: Sequence[str] = ()
) -> tuple[C, str, list[str]]:
    """The config of a run to resume: the one stored in its checkpoint, with ``overrides`` on top.

    ``resume``, ``config`` and ``overrides`` are ``--resume``, ``--config`` and the ``KEY=VALUE`` words, read as
    :data:`RESUME_HELP` says; with a checkpoint, ``config`` only supplies ``out_dir`` for ``"auto"`` (values that
    differ from the stored config are named in a note and not used).

    Returns:
        ``(config, resume, notes)``: the run's config (its checkpoint's, with the overrides on top; ``out_dir`` is the
        run folder), what the job resumes from (the checkpoint file, or ``"auto"``: a new run in a folder without
        checkpoints) and the lines to print (the checkpoint used, the changed values, skipped files, dropped keys).

    Raises:
        ConfigError: A bad override, or nothing to build the config from.
        CheckpointError: ``resume`` is a file that is not a training checkpoint (or none).
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
        found, skipped = checkpointer.scan(resume)
        if found is None:  # a new run in that folder, from --config or the folder's own config.yaml
            source = config if config is not None else run_dir / "config.yaml"
            if config is None and not Path(source).is_file():
                raise ConfigError(
                    f"--resume {resume}: {run_dir} has no checkpoint to resume and no config.yaml; pass --config FILE "
                    "to start a new run there"
                )
            cfg = dataclasses.replace(load_config(cls, source, overrides), out_dir=str(run_dir))  # type: ignore[type-var]
            return cfg, "auto", notes
        path, ckpt = found
        notes += [f"--resume: skipping unusable checkpoint {bad} ({why})" for bad, why in skipped]
    if not isinstance(ckpt["config"], Mapping):
        raise CheckpointError(f"{path} holds no config to resume from")
    stored, dropped = _without_retired_keys(cls, ckpt["config"])
    try:
        base = from_dict(cls, stored)
    except ConfigError as e:
        raise ConfigError(f"the config stored in {path}: {e}") from e
    cfg = dataclasses.replace(from_dict(cls, stored, overrides), out_dir=str(run_dir))  # type: ignore[type-var]
    state = ckpt["state"]
    notes.append(
        f"resuming {run_dir} from {path} (epoch {state['epoch']}, step {state['step']}) with its stored config"
    )
    if dropped:
        notes.append(f"the stored config holds keys this version no longer has; dropped: {', '.join(dropped)}")
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
    return cfg, str(path), notes


def _without_retired_keys(cls: type, stored: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A stored config without the :data:`RETIRED_KEYS` that ``cls`` does not have, and the keys dropped."""
    out, known = copy.deepcopy(dict(stored)), flatten(to_dict(cls()))
    dropped = [key for key in RETIRED_KEYS if key in flatten(out) and key not in known]
    for key in dropped:
        *sections, name = key.split(".")
        del functools.reduce(operator.getitem, sections, out)[name]
    return out, dropped


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of the leaves of nested mappings."""
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _differences(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in a, value in b)}`` where two configs differ (``out_dir`` left out)."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    keys = [k for k in [*fa, *(k for k in fb if k not in fa)] if k != "out_dir"]
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}


def _show(value: Any) -> str:
    return "null" if value is None else str(value)
