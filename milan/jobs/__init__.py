"""The jobs: one module per ``milan`` command, each a typed ``run(cfg)`` plus its small argparse adapter.

A job module declares the commands it serves, ``COMMANDS = {"name": "one-line help", ...}``, and has
``add_arguments(parser, command)`` and ``run(args) -> int``; a job with a config has its schema ``NameConfig`` in
:mod:`milan.train.config` (``milan config name``). :func:`commands` reads them from the sources, importing no job, so
a new job is its module and its schema, nothing else.
"""

from __future__ import annotations

import ast
from pathlib import Path


def commands() -> dict[str, tuple[str, str]]:
    """``{command: (module, one-line help)}`` of every job module: the jobs with a config first, then by name."""
    found = []
    for path in Path(__file__).parent.glob("*.py"):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMMANDS"]:
                for name, text in ast.literal_eval(node.value).items():
                    found.append((config_class_name(name) not in source, name, f"{__name__}.{path.stem}", text))
    return {name: (module, text) for _, name, module, text in sorted(found)}


def config_class_name(command: str) -> str:
    """The name of a job's schema in :mod:`milan.train.config`: ``pretrain`` -> ``PretrainConfig``."""
    return f"{command.capitalize()}Config"
