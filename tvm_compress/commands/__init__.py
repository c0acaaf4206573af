"""The CLI's subcommands: a registry, one module per command.

A command is a name, a help line, a function that adds its arguments to an argparse parser and
a handler ``run(args) -> exit code`` over the Python API. A new subcommand is a module here that
calls ``register_command`` (and an import line in ``_BUILTIN``).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List

_BUILTIN = ("compile", "bench", "run", "inspect", "targets", "demo")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: Dict[str, Command] = {}


def register_command(command: Command) -> Command:
    if command.name in _COMMANDS:
        raise ValueError(f"command {command.name!r} registered twice")
    _COMMANDS[command.name] = command
    return command


def commands() -> List[Command]:
    """Every registered command, the built-in ones first, in registration order."""
    for name in _BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
    return list(_COMMANDS.values())
