"""The configuration reference (docs/configuration_reference.md), generated from the schemas.

The schemas are the only home of defaults, and their attribute docstrings the only description of
a field, so the reference is written from them and a test fails when the committed page differs
from what this module writes: it cannot drift. Regenerate with

    python -m rayrlhf.jobs.config.reference docs/configuration_reference.md
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rayrlhf.jobs.config.run import RunConfig
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.config.supervised import RMConfig, SFTConfig
from rayrlhf.jobs.config.tune import TuneConfig

ROOTS: list[tuple[str, type[BaseModel], str]] = [
    ("rayrlhf train, eval (and each Tune trial)", RunConfig, "ray_configs/default.yaml"),
    ("rayrlhf tune", TuneConfig, "ray_configs/tune.yaml"),
    ("rayrlhf sft", SFTConfig, "ray_configs/sft.yaml"),
    ("rayrlhf train-rm", RMConfig, "ray_configs/rm.yaml"),
    ("rayrlhf serve", ServeConfig, "ray_configs/serve.yaml"),
]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes a field's type holds (itself, or inside Optional/list/dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"\brayrlhf\.jobs\.config\.\w+\.|\bpydantic\.types\.", "", text)  # a schema's bare name


def _default(info: Any) -> str:
    if info.default is PydanticUndefined:
        return "required" if info.default_factory is None else "(see below)"
    if isinstance(info.default, BaseModel):
        return "(see below)"
    return f"`{info.default!r}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def section(prefix: str, model: type[BaseModel], seen: set[tuple[str, type]]) -> list[str]:
    """A table of `model`'s own fields, then one section per nested schema."""
    lines = [f"### `{prefix or '(top level)'}`", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        lines += [_cell(model.__doc__), ""]
    lines += ["| field | type | default | what it does |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        lines.append(f"| `{name}` | `{_cell(_type(info.annotation))}` | {_cell(_default(info))} | {_cell(info.description)} |")
        nested += [(f"{prefix}.{name}" if prefix else name, m) for m in _models_in(info.annotation)]
    lines.append("")
    for path, sub in nested:
        if (path, sub) not in seen:
            seen.add((path, sub))
            lines += section(path, sub, seen)
    return lines


def markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the pydantic schemas in `jobs/config/` by `python -m rayrlhf.jobs.config.reference "
             "docs/configuration_reference.md`; a test fails when it is out of date. Every field below can be set "
             "in a YAML file or with `--set section.field=value`.", ""]  # fmt: skip
    for verb, model, example in ROOTS:
        lines += [f"## {verb}", "", f"Schema `{model.__name__}`; example `{example}`.", ""]
        lines += section("", model, set())
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    out = markdown()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(out)
    else:
        sys.stdout.write(out)
