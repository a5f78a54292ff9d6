"""The recipe-level `train:` section: defaults for every train step, whatever its mode.

A recipe's `train:` is shared by its train steps (chart-demo's align and sft; chameleon's sft,
rm, dpo and ppo), so it may hold settings of several modes. `TrainDefaults` is made from the six
method configs: every setting of any mode, with its type, constraints and description (which
names the modes it belongs to); a setting whose default differs between modes defaults to null
("the mode's default"). The pipeline builder hands each step the settings its mode has
(`defaults_for`) and reports settings no step of the pipeline takes (`unused_defaults`).

It also gives the shape results were fingerprinted with before the split into per-method
configs (`fingerprinted_settings`), so committed results and checkpoints stay reusable.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from mmjobs.config_base import StrictModel
from mmjobs.train.methods.common import NOT_FINGERPRINTED, TrainBase
from mmjobs.train.methods.modes import (
    DEFAULT_MODE,
    METHODS,
    PREFERENCE_MODES,
    RL_MODES,
    TRAIN_MODES,
)


class _DefaultsBase(StrictModel):
    # `unknown_key_message` explains keys a recipe may still carry.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None


def _merged(name: str, doc: str, members: dict[str, type[BaseModel]],
            skip: frozenset[str] = frozenset()) -> type[BaseModel]:
    """A model with every field of `members` (mode -> model), in first-seen order."""
    seen: dict[str, list[tuple[str, FieldInfo]]] = {}
    for mode, model in members.items():
        for field, info in model.model_fields.items():
            if field not in skip:
                seen.setdefault(field, []).append((mode, info))
    fields: dict[str, Any] = {}
    for field, entries in seen.items():
        modes = [mode for mode, _ in entries]
        info = entries[0][1]
        where = "" if len(modes) == len(members) else f" (mode{'s' * (len(modes) > 1)} " \
            f"{', '.join(modes)})"
        sections = {mode: _model_in(i.annotation) for mode, i in entries}
        if all(sections.values()) and len(set(sections.values())) > 1:
            # The same section holds other settings per mode (preference, rl): merge them.
            sub = _merged(f"{field.title()}Defaults", f"train.{field} of every mode.",
                          sections)  # type: ignore[arg-type]
            fields[field] = (sub, Field(default_factory=sub,
                                        description=f"{info.description}{where}"))
            continue
        defaults = {repr(i.get_default(call_default_factory=True)) for _, i in entries}
        copied = copy.copy(info)
        copied.description = f"{info.description}{where}"
        if len(defaults) > 1:  # e.g. rl.num_generations: 1 for ppo, 8 for grpo
            per_mode = ", ".join(f"{m} {i.get_default()!r}" for m, i in entries)
            fields[field] = (Annotated[info.annotation | None, *info.metadata],
                             Field(None, description=f"{info.description}{where} Null: the "
                                   f"mode's default ({per_mode})."))
        else:
            fields[field] = (info.annotation, copied)
    return create_model(name, __base__=_DefaultsBase, __doc__=doc, __module__=__name__,
                        **fields)


TrainDefaults = _merged(
    "TrainDefaults", "Training defaults for every train step of a recipe: each step takes "
    "the settings its mode has (see mmjobs.train.methods).", METHODS, skip=frozenset({"mode"}))
TrainDefaults.REMOVED_KEYS = {
    "mode": "each train step of the pipeline sets its own mode (e.g. chart-demo's align and "
            "sft steps); remove it here (stages.<step>.train holds a step's own settings)"}


def defaults_for(mode: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe-level train settings (a `TrainDefaults` dump) a step of `mode` takes: those
    its config class has, nested sections filtered alike. An unknown mode keeps everything
    (validation then reports the mode)."""
    model = METHODS.get(mode)
    return dict(given) if model is None else _taken(model, given)


def _taken(model: type[BaseModel], given: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in given.items():
        info = model.model_fields.get(key)
        if info is None:
            continue
        section = _model_in(info.annotation)
        out[key] = _taken(section, value) if section and isinstance(value, Mapping) else value
    return out


def unused_defaults(given: Mapping[str, Any], steps: Mapping[str, str]) -> list[tuple[str, str]]:
    """Recipe-level train settings no train step takes, as `(dotted setting, message)`.

    Args:
        given: the recipe's `train:` settings that differ from the defaults.
        steps: step name -> mode of every train step of the pipeline.
    """
    if not given:
        return []
    if not steps:
        return [(key, "this pipeline has no train step; remove it") for key in given]
    runs = ", ".join(f"{step} ({mode})" for step, mode in steps.items())
    modes = {mode: METHODS[mode] for mode in dict.fromkeys(steps.values()) if mode in METHODS}
    return [(path, f"a setting of mode {', '.join(having)} only, and no train step here runs "
                   f"one (train steps: {runs}); remove it, or set it under stages.<step>.train")
            for path, having in _unused(given, modes, {m: METHODS[m] for m in TRAIN_MODES})]


def step_defaults(defaults: Mapping[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    """A train step's defaults (a stage config's `model`, `train`, ...) with only the
    recipe-level train settings its mode has; the mode comes from the step's own section
    (`section["train"]["mode"]`, default sft)."""
    train = defaults.get("train") or {}
    return {**defaults, "train": defaults_for(_step_mode(section), train)}


def unused_in_steps(given: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """`unused_defaults` of the recipe's `train:` settings `given` for the train steps
    `steps` (step name -> its own section), as `train.<setting>: message` lines."""
    modes = {step: _step_mode(section) for step, section in steps.items()}
    return [f"train.{path}: {message}" for path, message in unused_defaults(given, modes)]


def _step_mode(section: Mapping[str, Any]) -> str:
    return (section.get("train") or {}).get("mode") or DEFAULT_MODE


def _unused(given: Mapping[str, Any], used: dict[str, type[BaseModel]],
            every: dict[str, type[BaseModel]], prefix: str = "") -> list[tuple[str, list[str]]]:
    """(path, modes having it) of each key of `given` that no model of `used` has."""
    out = []
    for key, value in given.items():
        taking = {m: model for m, model in used.items() if key in model.model_fields}
        if not taking:
            having = [m for m, model in every.items() if key in model.model_fields]
            out.append((f"{prefix}{key}", having))
            continue
        sections = {m: _model_in(model.model_fields[key].annotation) for m, model in taking.items()}
        if isinstance(value, Mapping) and all(sections.values()):
            below = {m: _model_in(model.model_fields[key].annotation) for m, model in every.items()
                     if key in model.model_fields}
            out += _unused(value, sections, below, f"{prefix}{key}.")  # type: ignore[arg-type]
    return out


# ------------------------------------------------------------------------------ fingerprints

# Settings whose default differs per mode were one setting defaulting to null before the split.
_LEGACY = TrainDefaults().model_dump(mode="json")


def fingerprinted_settings(cfg: TrainBase) -> dict[str, Any]:
    """The settings that decide the trained weights, in the shape results were fingerprinted
    with before per-method configs: every setting of the old all-modes config (a setting of
    other modes at its default), preference settings only in dpo/rm, rl settings only in
    ppo/grpo, and a per-mode default (`rl.num_generations`, `rl.kl_coef`) as null."""
    mode = cfg.mode
    data = _legacy(cfg, TrainDefaults, _LEGACY)
    # group_by_modality unset changes no order that ever finished training (it groups only
    # where ungrouped ranks desynchronise), so it stays out until set.
    # The optimizer settings added later (betas, eps, no_decay, param_groups) likewise stay
    # out while at their defaults, which are the optimizer every earlier result used.
    skip = NOT_FINGERPRINTED | ({"preference"} if mode not in PREFERENCE_MODES else set()) | \
        ({"rl"} if mode not in RL_MODES else set()) | \
        ({"group_by_modality"} if cfg.group_by_modality is None else set()) | \
        {k for k, default in _OPTIMIZER_DEFAULTS.items() if getattr(cfg, k) == default}
    for section, later in _LATER_SECTION_DEFAULTS.items():
        # Settings added to a section later stay out while at the default every earlier
        # result was trained with.
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items()
                             if k not in later or v != later[k]}
    return {"mode": mode, **{k: v for k, v in data.items() if k not in skip}}


_OPTIMIZER_DEFAULTS = {"adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "no_decay": "none",
                       "param_groups": []}
# JSON-dumped defaults of section settings added after results were fingerprinted.
_LATER_SECTION_DEFAULTS = {
    "preference": {"rm_regularization": 0.0},
    "rl": {"critic": "value_head", "critic_lr": None, "critic_lr_schedule": "constant",
           "critic_weight_decay": 0.0},
}


def _legacy(value: BaseModel, merged: type[BaseModel], legacy: dict[str, Any]) -> dict[str, Any]:
    out = dict(legacy)
    dumped = value.model_dump(mode="json")
    for field in type(value).model_fields:
        if field == "mode":
            continue
        info = merged.model_fields.get(field)
        current = getattr(value, field)
        section = _model_in(info.annotation) if info is not None else None
        if section is not None and isinstance(current, BaseModel):
            out[field] = _legacy(current, section, legacy[field])
        elif info is not None and legacy.get(field) is None and \
                current == type(value).model_fields[field].get_default(call_default_factory=True):
            out[field] = None  # this mode's own default of a per-mode setting
        else:
            out[field] = dumped[field]
    return out


# ------------------------------------------------------------------------------ docs


def settings_table() -> str:
    """A Markdown table of which train settings each mode has (the README's), one row per
    group of settings with the same modes; sections whose settings differ per mode
    (`preference`, `rl`) are listed by setting."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for path, modes in _setting_modes(METHODS):
        groups.setdefault(tuple(modes), []).append(f"`{path}`")
    rows = ["| settings | " + " | ".join(TRAIN_MODES) + " |",
            "|---|" + "---|" * len(TRAIN_MODES)]
    for modes, paths in groups.items():
        marks = " | ".join("✔" if mode in modes else "" for mode in TRAIN_MODES)
        rows.append(f"| {', '.join(paths)} | {marks} |")
    return "\n".join(rows)


def _setting_modes(members: Mapping[str, type[BaseModel]],
                   prefix: str = "") -> list[tuple[str, list[str]]]:
    seen: dict[str, dict[str, type[BaseModel] | None]] = {}
    for mode, model in members.items():
        for field, info in model.model_fields.items():
            if field != "mode":
                seen.setdefault(field, {})[mode] = _model_in(info.annotation)
    out: list[tuple[str, list[str]]] = []
    for field, sections in seen.items():
        if all(sections.values()) and len(set(sections.values())) > 1:
            out += _setting_modes(sections, f"{prefix}{field}.")  # type: ignore[arg-type]
        else:
            out.append((f"{prefix}{field}", list(sections)))
    return out
