"""``tvm-compress targets``: the target presets."""

from __future__ import annotations

import json

from . import Command, register_command


def add_arguments(t) -> None:
    t.add_argument("--targets-file", action="append", metavar="TOML", help="extra target presets")
    t.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from tvm_compress.targets import list_targets, load_target_files

    if args.targets_file:
        load_target_files(args.targets_file)
    profiles = list_targets()
    if args.json:
        print(json.dumps([{"name": p.name, "family": p.family, "description": p.description,
                           "target": p.target, "features": p.features} for p in profiles], indent=2))
        return 0
    for p in profiles:
        print(f"{p.name:16s} {p.family:8s} {p.description}")
    return 0


register_command(Command("targets", "list target presets", add_arguments, run))
