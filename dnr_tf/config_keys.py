"""Every key of a config dataclass with its default and meaning: `--list_keys` of the entry points.

The meaning is read from the `Attributes:` section of each dataclass's docstring (Google style),
so the listing follows the config classes without a second copy to keep in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re

from dnr_tf import config_io


def _attribute_docs(cls) -> dict[str, str]:
    """{field: one-line meaning} from the `Attributes:` section of a class docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "Attributes:" not in doc:
        return {}
    out: dict[str, str] = {}
    name = None
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^ {4}(\w+):\s*(.*)$", line)
        if match:
            name = match.group(1)
            out[name] = match.group(2).strip()
        elif name and line.startswith(" " * 8):
            out[name] += " " + line.strip()
        elif line.strip():
            name = None
    return out


def describe(cls, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, meaning) of every leaf field of a config dataclass, in declaration order."""
    docs = _attribute_docs(cls)
    rows = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if dataclasses.is_dataclass(default):
            rows.extend(describe(type(default), f"{key}."))
        else:
            rows.append((key, config_io.to_dict({"v": default})["v"], docs.get(field.name, "")))
    return rows


def format_keys(cls) -> str:
    """The listing printed by `--list_keys`: `key=default` (as `--set` takes it), then its meaning."""
    lines = []
    for key, default, meaning in describe(cls):
        lines.append(f"{key}={json.dumps(default)}")
        if meaning:
            lines.append(f"    {meaning}")
    return "\n".join(lines)


def list_keys_action(cls):
    """An argparse action that prints every key of `cls` and exits, like `--help` (no other flag needed)."""

    class ListKeys(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None):
            print(format_keys(cls))
            parser.exit()

    return ListKeys
