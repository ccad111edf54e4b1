"""``milan config JOB``: every key of a job's config with its type, value and description, read from the schema.

The descriptions are the comments written next to (or on the lines right above) each field of the config
dataclasses, read from their source; a section's description is its class docstring. The text printed is therefore
the text in the code, and cannot drift from it. Types (with declared ranges, see :mod:`milan.ranges`) come from the
annotations, values from the defaults or from a preset merged over them.

Examples:
    >>> from milan.train.config import OptimConfig
    >>> field_docs(OptimConfig)["blr"]
    'base lr: lr = blr * effective batch / 256'
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from collections.abc import Mapping
from typing import Any, NamedTuple

from milan.jobs import commands, config_class_name
from milan.jobs.launch import flatten
from milan.train import config
from milan.train.config import (
    ConfigError,
    field_types,
    list_presets,
    load_config,
    parse_overrides,
    read_yaml,
    resolve_preset,
    type_name,
)

COMMANDS = {"config": "every config key of a job: type, default (or a preset's value), description"}
# The jobs with a config: each command whose schema NameConfig is in milan.train.config.
JOBS: dict[str, type] = {
    name: getattr(config, config_class_name(name)) for name in commands() if hasattr(config, config_class_name(name))
}


class KeyInfo(NamedTuple):
    """One line of ``milan config``: a key, or a section (``type == "section"``, no value)."""

    key: str  # dotted
    type: str  # the annotation in words, with its range: "float in [0, 1)"
    value: str  # as YAML would write it
    description: str
    explicit: bool = False  # set by the preset or an override (not a default)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the comment beside it or on the lines right above it (subclasses win).

    Fields without a comment are left out.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _class_comments(klass).items() if v})
    return docs


def _class_comments(klass: type) -> dict[str, str]:
    """The comments of the field definitions in a class body: the comment lines right above, then the one beside."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
        return {}
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    own_line = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            first = node.lineno
            while first - 1 in own_line:  # a blank line detaches the comments above it
                first -= 1
            end = node.end_lineno or node.lineno
            texts = [comments[n] for n in range(first, end + 1) if n in comments]
            out[node.target.id] = " ".join(texts).strip()
    return out


def describe(cfg: Any, explicit: set[str] | None = None, prefix: str = "") -> list[KeyInfo]:
    """The lines of ``milan config`` for a config instance: sections, then their keys, in field order.

    ``explicit``: the dotted keys set by the preset or an override; ``prefix``: the dotted prefix of ``cfg``'s keys.
    """
    explicit = explicit or set()
    docs, hints = field_docs(type(cfg)), field_types(type(cfg))
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            doc = docs.get(f.name) or (type(value).__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out.append(KeyInfo(key, "section", "", doc))
            out.extend(describe(value, explicit, f"{key}."))
        else:
            out.append(KeyInfo(key, type_name(hints[f.name]), _yaml(value), docs.get(f.name, ""), key in explicit))
    return out


def _yaml(value: Any) -> str:
    """A value as it would be written in a preset or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


def format_table(rows: list[KeyInfo]) -> list[str]:
    """Aligned lines: key, type, value (``*`` when set explicitly), description; sections as ``[name]`` lines."""
    keys = [r for r in rows if r.type != "section"]
    w_key = max((len(r.key) for r in keys), default=3)
    w_type = min(max((len(r.type) for r in keys), default=4), 40)
    w_value = min(max((len(r.value) + 2 for r in keys), default=5), 30)
    lines = [f"{'KEY'.ljust(w_key)}  {'TYPE'.ljust(w_type)}  {'VALUE'.ljust(w_value)}  DESCRIPTION"]
    for r in rows:
        if r.type == "section":
            lines.append(f"[{r.key}]  {r.description}".rstrip())
            continue
        value = r.value + (" *" if r.explicit else "")
        lines.append(f"{r.key.ljust(w_key)}  {r.type.ljust(w_type)}  {value.ljust(w_value)}  {r.description}".rstrip())
    return lines


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "words",
        nargs="*",
        metavar="JOB [KEY=VALUE ...]",
        help=f"the job whose keys to print ({', '.join(JOBS)}), then dotted overrides applied on top",
    )
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="a preset name or YAML file: print its values instead of the defaults"
    )


def run(args: argparse.Namespace) -> int:
    """Prints a job's keys (or, without a job, the jobs and the installed presets)."""
    job, overrides = (args.words[0], args.words[1:]) if args.words else (None, [])
    if job is not None and job not in JOBS:
        raise ConfigError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    if job is None:
        if args.config:
            raise ConfigError("name the job first, e.g. milan config pretrain --config demo_cpu")
        print("jobs: " + ", ".join(JOBS) + "  (milan config JOB prints every key of JOB's config)")
        presets = list_presets()
        print("presets (--config NAME, from any folder): " + (", ".join(presets) if presets else "none installed"))
        return 0
    cfg: Any = load_config(JOBS[job], args.config, overrides)
    explicit: set[str] = set()
    where = "overrides"
    if args.config:
        path = resolve_preset(args.config, job)
        explicit |= set(flatten(read_yaml(path)))
        where = f"{path}{' and overrides' if overrides else ''}"
    explicit |= set(flatten(parse_overrides(overrides)))
    marked = f"; * = set by {where}" if explicit else ""
    print(f"milan {job}: every config key (values: {'resolved' if explicit else 'the defaults'}{marked})")
    print("\n".join(format_table(describe(cfg, explicit))))
    return 0
