"""Typed configs (pydantic v2) every layer shares: YAML loading, dotted ``--set`` overrides,
dumping, and the recipe sections the components read (model, data, eval, cluster, images).

`load_config` validates any config model (a stage's, a recipe) from a file or a mapping with
overrides, and reports every problem at once in a `ConfigError` (unknown keys with
suggestions, bad values, missing fields, credentials in the file), for the file and the
overrides together. The whole recipe, which also holds the training methods' settings, is
`mmjobs.recipe.RecipeConfig`: it combines component configs, so it lives above the core.

Example::

    cfg = load_config(ModelConfig, {"name_or_path": "s3://models/llava"}, ["dtype=bfloat16"])
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    Field,
)

from mmjobs.config_base import StrictModel
from mmjobs.config_cluster import (
    ClusterConfig,
    ImagesConfig,
    SecretNames,
    StageResources,
)
from mmjobs.config_errors import (
    ConfigError,
    apply_override,
    field_names,
    parse_override,
    read_yaml,
    validate_as,
    validation_errors,
)

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "ConversationFormatName",
    "DataConfig",
    "EvalConfig",
    "ImagesConfig",
    "ModelConfig",
    "SecretNames",
    "StageResources",
    "StrictModel",
    "dump_recipe",
    "flatten",
    "load_config",
]

M = TypeVar("M", bound=BaseModel)
# Recipe names end up in Kubernetes and KFP object names, which must be DNS-1123 labels.
_KEBAB = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

SourceFormat = Literal[
    "llava", "chartmoe", "aihub-chart", "chart-align", "scienceqa", "dataengine",
    "preference", "prompt-only", "synthetic-charts", "canonical",
]  # fmt: skip


# How conversations become model text (mmjobs.data.conversation): the model's chat template, or
# a seed's built-in format for base models that ship none.
ConversationFormatName = Literal["auto", "template", "vicuna_v1", "plain", "anything_ti2ti",
                                 "internlm_xcomposer2", "chartmoe_eval", "lavin"]


class ModelConfig(StrictModel):
    """Which model to load and how."""

    name_or_path: str = Field(
        description="Local directory, s3:// prefix in the store, or a Hugging Face hub id."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped with the checkpoint. Off unless a recipe sets it; "
        "InternLM-XComposer2 needs it.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' uses the checkpoint's (float32 on CPU)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs a GPU image."
    )
    conversation_format: ConversationFormatName = Field(
        "auto",
        description="How conversations become text for pretokenize, infer and serve. auto / "
        "template: the model's chat template (auto fails, naming the others, on a model without "
        "one). vicuna_v1: LLaVA-1.5 fine-tuning (vicuna-7b-v1.5, original LLaVA checkpoints); "
        "plain: LLaVA projector pretraining; anything_ti2ti: Align-Anything on Chameleon.",
    )


class DataConfig(StrictModel):
    """Where the training data comes from and how it is cut."""

    source_format: SourceFormat = Field(
        description="Format of the raw input, converted to the canonical format by `prepare`."
    )
    input: str | None = Field(None, description="Raw data location: local path or s3:// URI.")
    max_length: int = Field(2048, gt=0, description="Token budget per sample (text + image).")
    max_reject_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fail `prepare` if more than this fraction of samples is malformed.",
    )


class EvalConfig(StrictModel):
    """Evaluation settings."""

    benchmarks: list[str] = Field(default_factory=list, description="Benchmarks to run.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length cap per answer.")
    baseline: bool = Field(
        False, description="Also train and evaluate the baseline row of the seed's table "
        "(llava-dataengine: the same LoRA recipe on LLaVA's mix665k without the DataEngine "
        "data, the README's 'None (baseline)'). Pipelines without a baseline row refuse it.")


def load_config(
    model_cls: type[M],
    data_or_path: Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    source: str | None = None,
) -> M:
    """Validate a config from a YAML file or a mapping, with dotted overrides applied.

    Args:
        model_cls: the pydantic model to validate against (a `StrictModel` subclass), or a
            discriminated union of them such as `TrainConfig` (validated as the member its
            `mode` names).
        data_or_path: YAML file path, or already-parsed data (not modified).
        overrides: ``KEY=VALUE`` strings, e.g. ``train.lr=2e-5``; VALUE is parsed as YAML.
        source: label for messages; defaults to the path, or ``config`` for a mapping.

    Returns:
        The validated model instance.

    Raises:
        ConfigError: listing every problem in the file and the overrides.
    """
    if isinstance(data_or_path, str | Path):
        source = source or str(data_or_path)
        data, file_errors = read_yaml(Path(data_or_path), source)
    else:
        source = source or "config"
        data, file_errors = copy.deepcopy(dict(data_or_path)), []
    if not file_errors and not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        fields = ", ".join(f"{name}:" for name in field_names(model_cls))
        file_errors.append(f"{source}: expected a mapping of keys ({fields}) at the top, got {got}")

    # Errors are tagged with an origin (-1 = file, i = overrides[i]) so the file's come first.
    tagged: list[tuple[int, str]] = [(-1, e) for e in file_errors]
    applied: list[tuple[int, tuple[str, ...], str]] = []
    for i, text in enumerate(overrides):
        parsed = parse_override(model_cls, text)
        if isinstance(parsed, str):
            tagged.append((i, parsed))
            continue
        path, value, label = parsed
        applied.append((i, path, label))
        if not file_errors:
            apply_override(data, path, value)

    if not file_errors:
        tagged.extend(validation_errors(model_cls, data, applied))
    if tagged:
        tagged.sort(key=lambda item: item[0])  # stable: keeps order within each origin
        raise ConfigError(source, [message for _, message in tagged])
    return validate_as(model_cls, data)


def dump_recipe(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (defaults included); `load_recipe` reads it back."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Dotted scalar params for MLflow: ``{"train.lr": 2e-4, "eval.benchmarks": "[...]"}``.

    Nested models become dotted keys; lists, dicts and None become JSON strings.
    """
    out: dict[str, str | int | float | bool] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, prefix=f"{key}."))
        elif isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            out[key] = json.dumps(_jsonable(value), sort_keys=True, ensure_ascii=False)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
