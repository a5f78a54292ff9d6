"""Nested recipe sections addressed by dotted paths (`train.lr`), and the stand-ins wired fields
get while a step's config is validated before the pipeline fills them (`Build.config`)."""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping
from typing import Any

# What a wired field (filled by an upstream step at run time) holds while its config is validated.
PLACEHOLDER = "<wired by the pipeline>"


def attr(model: Any, path: str) -> Any:
    """The value at dotted `path` of a validated config."""
    for part in path.split("."):
        model = getattr(model, part, None)
    return model


def stand_in(spec: Any, path: str) -> Any:
    """The value standing in for wired field `path` of `spec`'s config while it is validated:
    the input's own placeholder (e.g. a URL for infer's endpoint.url), else by field type."""
    for declared in spec.inputs:
        if declared.field == path and declared.placeholder is not None:
            return declared.placeholder
    return _placeholder_for(spec.config, path)


def _placeholder_for(config: type, path: str) -> Any:
    """A value standing in for a wired input while the config is validated: a list or a map
    for fields of those types (e.g. mix's datasets, build-moe-connector's experts)."""
    model: Any = config
    annotation: Any = None
    for part in path.split("."):
        field_info = getattr(model, "model_fields", {}).get(part)
        if field_info is None:
            return PLACEHOLDER
        annotation = model = field_info.annotation
    origin = typing.get_origin(annotation)
    if origin is list:
        return [PLACEHOLDER]
    if origin is dict:
        return {"expert": PLACEHOLDER}
    return PLACEHOLDER


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` (nested mappings merged, everything else replaced)."""
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of nested `data` by its dotted path: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def get_path(data: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value at dotted `path` of nested `data`, or `default` where any part is missing."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set dotted `path` of nested `data` to `value`, creating the sections on the way."""
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
