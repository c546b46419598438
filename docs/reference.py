"""Writes the configuration reference (docs/configuration.md) from the typed config: every key of
every command with its type, default and help line. `tests/test_docs.py` fails when the page differs
from what this writes, or when a key has no help line, so the reference cannot drift from the code.

    python docs/reference.py > docs/configuration.md
"""

from __future__ import annotations

import json
from enum import Enum

from pipeline import config
from pipeline.cli import PROGRAMS, SCHEMAS
from pipeline.config import help_lines

INTRO = """# Configuration reference

Every key each command takes, generated from the typed config (`pipeline/config.py`) by
`python docs/reference.py > docs/configuration.md`; a test fails when this page and the code differ.
Set a key on the command line (`kosmos-annotate engine.batch_size=16`), in a YAML file of your own
(`--config-dir conf/ --config-name mine`), or from Python (`overrides={"engine.batch_size": 16}`).
`null` means "chosen for this machine or input", as each line says.
"""


def _value(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    return json.dumps(value) if not isinstance(value, str) else value


def _type(name: str) -> str:
    """`WeightFormat | None` as `fp32, fp16, int8, int4 or null`: a choice by its values."""
    words = []
    for part in (p.strip() for p in name.split("|")):
        choice = getattr(config, part, None)
        if isinstance(choice, type) and issubclass(choice, Enum):
            words.append(", ".join(str(c) for c in choice))
        else:
            words.append({"None": "null", "Any": "list, mapping or file"}.get(part, part))
    return " or ".join(words)


def reference() -> str:
    out = [INTRO]
    for name, schema in SCHEMAS.items():
        out.append(f"\n## {PROGRAMS[name] if name != 'export' else 'kosmos-export'}\n")
        if schema.__doc__ and name != "config":
            out.append(f"\n{schema.__doc__.strip()}\n")
        out.append("\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n")
        for key, kind, default, help_ in help_lines(schema):
            cell = help_.replace("|", "\\|")
            out.append(f"| `{key}` | {_type(kind)} | `{_value(default)}` | {cell} |\n")
    return "".join(out)


if __name__ == "__main__":
    print(reference(), end="")
