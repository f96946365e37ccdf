"""Config dataclasses <-> command lines, JSON files, and the error type for user mistakes.

The bottom of the project: every script builds its CLI from a typed dataclass with `arg` fields, so
`--help` explains every flag, unknown flags are an error, and one validation function reports every
problem at once. Imports nothing from the project.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import field, fields


class UsageError(Exception):
    """A user mistake (missing file, bad flag, wrong path): scripts print it without a traceback."""


def arg(default, help: str):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help})


def build_parser(cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one --flag per dataclass field; bools get --flag / --no-flag."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    return parser


def parse_config(cls, argv, description: str, validate=None, prog: str | None = None):
    """Parse argv into a `cls` dataclass; unknown flags and every validation problem are errors."""
    parser = build_parser(cls, description, prog)
    cfg = cls(**vars(parser.parse_args(argv)))
    errors = validate(cfg) if validate else []
    if errors:
        parser.error("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def config_from_dict(cls, data: dict):
    """Dataclass from a saved config.json, ignoring keys this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def write_json_atomic(path: str, data) -> None:
    """Write JSON to a temporary file, then rename it into place: readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def parse_positive_or_auto(text, flag: str) -> int:
    """A flag that takes a positive number or "auto": the number, or 0 for auto; ValueError naming the flag."""
    if str(text).strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be a positive number or auto, got {text!r}")
    return value
