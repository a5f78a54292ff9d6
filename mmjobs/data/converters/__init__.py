"""Converters from published dataset layouts to the canonical format.

Each converter is a function `(ctx: ConvertContext) -> Iterator[Record | Reject]` registered
under the name users pass to `mmjobs prepare --from NAME`. A converter yields one item per input
row: a canonical record, or a `Reject` saying which row and why, so counts always reconcile
(`input rows = accepted + rejected`). Converters do not check images or lengths; the `prepare`
stage runs `mmjobs.data.validate` on every record they yield.

Image paths in records are relative to the dataset's image root: `ctx.image_root` for converters
that reference existing images, or the output dataset directory for converters that draw images
(they write them under `ctx.output_images` and reference them as `images/<name>`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmjobs import layout
from mmjobs.data.records import Kind, Record, Reject

IMAGES_DIR = layout.IMAGES_DIR


@dataclass
class ConvertContext:
    """What a converter gets.

    Attributes:
        input: raw input URI (file or directory, local or s3://); None for generators.
        image_root: URI that image paths in the raw data are relative to (defaults to the
            input's directory, decided by the prepare stage).
        output_images: local directory where converters that draw images write them.
        options: converter-specific settings (prompt templates, prompt format, split, ...).
        seed: for converters that sample.
    """

    input: str | None
    image_root: str | None
    output_images: Path
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


ConvertFn = Callable[[ConvertContext], Iterator[Record | Reject]]


@dataclass(frozen=True)
class Converter:
    """A registered converter: its function, record kind, whether it draws its own images and
    whether its samples may hold images in assistant turns (outputs of an image-generating
    model; the validator rejects them otherwise)."""

    name: str
    fn: ConvertFn
    kind: Kind = "sample"
    draws_images: bool = False
    help: str = ""
    images_in_responses: bool = False


_REGISTRY: dict[str, Converter] = {}
# Modules that register converters on import (kept lazy: matplotlib etc. load only when used).
_MODULES = ("llava", "chartmoe", "dataengine", "scienceqa", "preference", "aihub_chart",
            "chart_align", "synthetic_charts", "canonical")


def register(name: str, *, kind: Kind = "sample", draws_images: bool = False,
             help: str = "", images_in_responses: bool = False,
             ) -> Callable[[ConvertFn], ConvertFn]:
    """Decorator registering a converter function under `name`."""

    def wrap(fn: ConvertFn) -> ConvertFn:
        _REGISTRY[name] = Converter(name, fn, kind, draws_images, help or (fn.__doc__ or ""),
                                    images_in_responses)
        return fn

    return wrap


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":  # a real missing dependency, not our module
                raise


def get_converter(name: str) -> Converter:
    """The converter registered as `name`; `KeyError` lists the available names."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown input format {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of every registered converter."""
    _load_all()
    return sorted(_REGISTRY)
