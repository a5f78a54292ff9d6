"""Typed recipe configs (pydantic v2): YAML loading, dotted ``--set`` overrides, dumping.

A recipe is one YAML file (``pipelines/recipes/*.yaml``) validated by `RecipeConfig`. Loading
reports every problem at once in a `ConfigError` (unknown keys with suggestions, bad values,
missing fields, credentials in the file), for the file and the overrides together.

Example::

    cfg = load_recipe("pipelines/recipes/chart-demo.yaml", ["train.lr=2e-5"])
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mmjobs.config_errors import (
    ConfigError,
    apply_override,
    parse_override,
    read_yaml,
    validation_errors,
)

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "RecipeConfig",
    "SecretNames",
    "StrictModel",
    "TrainConfig",
    "dump_recipe",
    "flatten",
    "load_config",
    "load_recipe",
    "validate_main",
]

M = TypeVar("M", bound=BaseModel)
# Recipe names end up in Kubernetes and KFP object names, which must be DNS-1123 labels.
_KEBAB = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

SourceFormat = Literal[
    "llava", "chartmoe", "aihub-chart", "chart-align", "scienceqa", "dataengine",
    "preference", "prompt-only", "synthetic-charts", "canonical",
]  # fmt: skip


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class LoraConfig(StrictModel):
    """LoRA adapter settings (used when train.finetune is 'lora')."""

    r: int = Field(8, gt=0, description="Adapter rank; higher adds capacity and memory.")
    alpha: int = Field(16, gt=0, description="Scaling numerator; effective scale is alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffixes) that get adapters.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapters, e.g. the projector.",
    )


class TrainConfig(StrictModel):
    """Optimisation settings for the training stages."""

    mode: Literal["align", "sft", "dpo", "rm", "ppo", "grpo"] = Field(
        "sft", description="align trains the projector only; sft/dpo/rm/ppo/grpo as usual."
    )
    finetune: Literal["full", "lora"] = Field("lora", description="Full weights or LoRA.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1, gt=0, description="Passes over the data (fractions allowed).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many steps; -1 uses epochs.")
    per_device_batch_size: int = Field(4, gt=0, description="Micro-batch size per GPU/process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_schedule: Literal[
        "cosine", "linear", "constant", "cyclic_triangular", "cyclic_triangular2",
        "step", "exponential",
    ] = Field("cosine", description="Learning-rate schedule after warmup.")  # fmt: skip
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    seed: int = Field(42, description="Seed for data order and initialisation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")


class EvalConfig(StrictModel):
    """Evaluation settings."""

    benchmarks: list[str] = Field(default_factory=list, description="Benchmarks to run.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length cap per answer.")


class SecretNames(StrictModel):
    """Names of Kubernetes Secrets mounted as env vars; never the credentials themselves."""

    s3: str = Field("mmjobs-s3", description="Secret with AWS_* keys for the object store.")
    mlflow: str = Field("mmjobs-mlflow", description="Secret with MLFLOW_TRACKING_* keys.")


class ClusterConfig(StrictModel):
    """Kubernetes resources for the stage pods (ignored by the local runner)."""

    gpus: int = Field(0, ge=0, description="NVIDIA GPUs per node (nvidia.com/gpu).")
    nodes: int = Field(1, ge=1, description="Nodes for training; >1 launches a TrainJob.")
    cpu: str | None = Field(None, description="CPU request/limit, e.g. '8' or '7500m'.")
    memory: str | None = Field(None, description="Memory request/limit, e.g. '64Gi'.")
    shm_size: str = Field("16Gi", description="/dev/shm size; DataLoader workers need it.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations, as in the Kubernetes API."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secret names for pulling private stage images."
    )
    secrets: SecretNames = Field(
        default_factory=SecretNames, description="Names of the credential Secrets."
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        # YAML reads `cpu: 8` as an int; Kubernetes quantities are strings.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return str(value) if is_number else value


class RecipeConfig(StrictModel):
    """A whole recipe: what to train and evaluate, and on what resources."""

    recipe: str = Field(
        description="Kebab-case recipe name, e.g. 'chart-demo'.",
        json_schema_extra={"pattern": _KEBAB},
    )
    description: str = Field("", description="One line on what the recipe reproduces.")
    experiment: str | None = Field(
        None,
        validate_default=True,
        description="MLflow experiment name; defaults to the recipe name.",
    )
    model: ModelConfig = Field(description="Base model.")
    data: DataConfig | None = Field(None, description="Training data; absent for eval-only.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Kubernetes resources."
    )

    @field_validator("recipe")
    @classmethod
    def _kebab_case(cls, value: str) -> str:
        # A custom error instead of `pattern=`: the message says what a valid name looks like.
        if not re.fullmatch(_KEBAB, value):
            raise PydanticCustomError(
                "kebab_case",
                "must be kebab-case: lowercase letters, digits and '-', e.g. 'chart-demo'",
            )
        return value

    @field_validator("experiment")
    @classmethod
    def _default_experiment(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator rather than a model validator: assigning inside an "after" model
        # validator re-triggers validation under validate_assignment.
        return value if value is not None else info.data.get("recipe")


def load_config(
    model_cls: type[M],
    data_or_path: Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    source: str | None = None,
) -> M:
    """Validate a config from a YAML file or a mapping, with dotted overrides applied.

    Args:
        model_cls: the pydantic model to validate against (a `StrictModel` subclass).
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
        fields = ", ".join(f"{name}:" for name in model_cls.model_fields)
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
    return model_cls.model_validate(data)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load and validate a recipe YAML file; raises `ConfigError` listing every problem."""
    return load_config(RecipeConfig, path, overrides)


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


def validate_main(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> int:
    """Back end of ``mmjobs validate FILE...``: one line per valid file, full errors otherwise.

    Returns:
        0 if every file is valid, 1 otherwise.
    """
    status = 0
    for path in paths:
        try:
            cfg = load_recipe(path, overrides)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            status = 1
        else:
            print(f"OK {path} (recipe {cfg.recipe})")
    return status
