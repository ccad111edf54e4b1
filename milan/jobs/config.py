"""``milan config JOB``: every key of a job's config with its type, value and description, read from the schema.

The descriptions are the comments written next to (or on the lines right above) each field of the config
dataclasses, read from their source with :mod:`tokenize`; a section's description is its class docstring. The text
printed is therefore the text in the code, and cannot drift from it. Types (with declared ranges, see
:mod:`milan.ranges`) come from the annotations, values from the defaults or from a preset merged over them.

Examples:
    >>> from milan.train.config import OptimConfig
    >>> field_docs(OptimConfig)["blr"]
    'base lr: lr = blr * effective batch / 256'
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from milan.train.config import ConfigError, field_types, load_config, parse_overrides, read_yaml, type_name
from milan.train.presets import list_presets, resolve_preset

# job -> (module, config class)
JOBS: dict[str, tuple[str, str]] = {
    "pretrain": ("milan.train.config", "PretrainConfig"),
    "linprobe": ("milan.train.eval_config", "LinprobeConfig"),
    "finetune": ("milan.train.eval_config", "FinetuneConfig"),
    "knn": ("milan.train.eval_config", "KnnConfig"),
}


@dataclass(frozen=True)
class KeyInfo:
    """One line of ``milan config``.

    Attributes:
        key: Dotted key (a section's own name for a section).
        type: The annotation in words, with its range (``float in [0, 1)``); ``section`` for a section.
        value: The value as YAML would write it (empty for a section).
        description: One line from the code.
        explicit: Set by the preset or an override (not a default).
    """

    key: str
    type: str
    value: str
    description: str
    explicit: bool = False


def config_class(job: str) -> type:
    """The config dataclass of a job (``pretrain``, ``linprobe``, ``finetune``, ``knn``)."""
    if job not in JOBS:
        raise KeyError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    module, name = JOBS[job]
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the comment beside it or on the lines right above it (subclasses win).

    Args:
        cls: A dataclass.

    Returns:
        Field name -> one-line description (fields without a comment are left out).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _class_comments(klass).items() if v})
    return docs


def _class_comments(klass: type) -> dict[str, str]:
    """Comments of the field definitions in a class body (source read with :mod:`inspect`, split by tokenize)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (e.g. defined in an interactive session)
        return {}
    out: dict[str, str] = {}
    level = 0
    code: list[tokenize.TokenInfo] = []  # code tokens of the current logical line
    beside: list[str] = []  # comments within the current logical line
    above: list[str] = []  # comment lines right above it
    comment_line = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            level += 1
        elif tok.type == tokenize.DEDENT:
            level -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (beside if code else above).append(text)
            comment_line = not code
        elif tok.type == tokenize.NL:
            if not code and not comment_line:  # a blank line detaches the comments above it
                above.clear()
            comment_line = False
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            is_field = len(code) >= 2 and code[0].type == tokenize.NAME and code[1].string == ":"
            if level == 1 and is_field:
                out[code[0].string] = " ".join([*above, *beside]).strip()
            code, beside, above = [], [], []
            comment_line = False
        else:
            code.append(tok)
    return out


def describe(cfg: Any, explicit: set[str] | None = None, prefix: str = "") -> list[KeyInfo]:
    """The lines of ``milan config`` for a config instance: sections, then their keys, in field order.

    Args:
        cfg: A config dataclass instance (defaults, or a preset merged over them).
        explicit: Dotted keys set by the preset or an override.
        prefix: Dotted prefix of ``cfg``'s keys.

    Returns:
        One :class:`KeyInfo` per section and per key.
    """
    explicit = explicit or set()
    docs, hints = field_docs(type(cfg)), field_types(type(cfg))
    out: list[KeyInfo] = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            doc = docs.get(f.name) or _first_line(type(value).__doc__)
            out.append(KeyInfo(key, "section", "", doc))
            out.extend(describe(value, explicit, f"{key}."))
        else:
            out.append(KeyInfo(key, type_name(hints[f.name]), _yaml(value), docs.get(f.name, ""), key in explicit))
    return out


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()


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


def _dotted(raw: Mapping[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _dotted(v, f"{key}.")
        out.add(key)
    return out


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
    """Adds ``milan config``'s arguments."""
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
        raise ConfigError(f"milan config: unknown job {job!r}; choose one of {', '.join(JOBS)}")
    if job is None:
        if args.config:
            print("milan config: name the job first, e.g. milan config pretrain --config demo_cpu", file=sys.stderr)
            return 2
        print("jobs: " + ", ".join(JOBS) + "  (milan config JOB prints every key of JOB's config)")
        presets = list_presets()
        print("presets (--config NAME, from any folder): " + (", ".join(presets) if presets else "none installed"))
        return 0
    cls = config_class(job)
    cfg: Any = load_config(cls, args.config, overrides)
    explicit: set[str] = set()
    where = "overrides"
    if args.config:
        path = resolve_preset(args.config, job)
        explicit |= _dotted(read_yaml(path))
        where = f"{path}{' and overrides' if overrides else ''}"
    explicit |= _dotted(parse_overrides(overrides))
    marked = f"; * = set by {where}" if explicit else ""
    print(f"milan {job}: every config key (values: {'resolved' if explicit else 'the defaults'}{marked})")
    print("\n".join(format_table(describe(cfg, explicit))))
    return 0


__all__ = ["JOBS", "KeyInfo", "config_class", "describe", "field_docs", "format_table"]
