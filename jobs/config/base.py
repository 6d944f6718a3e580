"""What every config schema shares: strict models, YAML loading, `--set` overrides, named errors.

Light to import (pydantic and PyYAML only), so the CLI can validate a config in a fraction of a
second, before anything heavy is imported or any cluster resource is claimed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "ray_configs"
"""The shipped configs: the repo's ray_configs/ (editable install) or the wheel's package data."""


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) into a nested dict."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' must look like section.field=value")
        key, raw = pair.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config_path(path: str | Path | None, default: str = "default.yaml") -> Path:
    """A config path as given, or a bare name looked up in ray_configs/."""
    if path is None:
        return CONFIG_DIR / default
    p = Path(path)
    if p.exists():
        return p
    named = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if named.exists():
        return named
    raise ConfigError(f"config file not found: {path}")


def load_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping, its relative paths anchored to the file's folder (see `anchored`)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return anchored(data, path.resolve().parent)


def anchored(value: Any, folder: Path) -> Any:
    """Relative paths written in a config file name files beside it: a string that names an existing
    file or folder relative to `folder` (for FILE.py:FUNCTION, the FILE part) becomes absolute, so a
    config and its files work from any working directory and from an installed wheel. Other strings
    (built-in names, paths relative to the working directory, --set values) are left as they are."""
    if isinstance(value, dict):
        return {k: anchored(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [anchored(v, folder) for v in value]
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    file, sep, function = value.partition(".py:")
    candidate = folder / (file + ".py" if sep else value)
    if not candidate.exists():
        return value
    return str(candidate) + (":" + function if sep else "")


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}:\n{format_errors(e)}") from None
