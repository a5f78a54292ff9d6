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
from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mmjobs.config_base import StrictModel
from mmjobs.config_errors import (
    ConfigError,
    apply_override,
    field_names,
    parse_override,
    read_yaml,
    validate_as,
    validation_errors,
)
from mmjobs.train.methods import (
    LayerDropoutConfig,
    LoraConfig,
    RewardConfig,
    TrainConfig,
    TrainDefaults,
)

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "ConversationFormatName",
    "DataConfig",
    "EvalConfig",
    "ImagesConfig",
    "LayerDropoutConfig",
    "LoraConfig",
    "ModelConfig",
    "PlanConfig",
    "RecipeConfig",
    "RewardConfig",
    "SecretNames",
    "StageResources",
    "StrictModel",
    "TrainConfig",
    "TrainDefaults",
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


# How conversations become model text (mmjobs.data.conversation): the model's chat template, or
# a seed's built-in format for base models that ship none.
ConversationFormatName = Literal["auto", "template", "vicuna_v1", "plain", "anything_ti2ti"]


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


class SecretNames(StrictModel):
    """Names of Kubernetes Secrets mounted as env vars; never the credentials themselves."""

    s3: str = Field("mmjobs-s3", description="Secret with AWS_* keys for the object store.")
    mlflow: str = Field("mmjobs-mlflow", description="Secret with MLFLOW_TRACKING_* keys.")


def _quantity(value: Any) -> Any:
    # YAML reads `cpu: 8` as an int; Kubernetes quantities are strings.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return str(value) if is_number else value


_URL_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@", re.IGNORECASE)


class StageResources(StrictModel):
    """Resources of one stage's pods; unset fields inherit from the cluster section."""

    gpus: int | None = Field(None, ge=0, description="NVIDIA GPUs (nvidia.com/gpu) per pod.")
    cpu: str | None = Field(None, description="CPU request and limit, e.g. '8'.")
    memory: str | None = Field(None, description="Memory request and limit, e.g. '64Gi'.")
    shm_size: str | None = Field(None, description="/dev/shm size (memory-backed emptyDir).")
    retries: int | None = Field(None, ge=0, le=10, description="Retries after a failure "
                                "(preemption); default: cluster.retries for resumable stages.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)


# Kubeflow Trainer's MPI-policy runtimes: they start ranks from a launcher over SSH, not with
# torchrun, so multi-node mmjobs training cannot use them.
MPI_RUNTIMES = ("deepspeed-distributed", "mpi-distributed", "mlx-distributed")


class ClusterConfig(StrictModel):
    """Kubernetes resources for the stage pods (ignored by the local runner)."""

    gpus: int = Field(0, ge=0, description="NVIDIA GPUs per node (nvidia.com/gpu).")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory per GPU in GiB, for `mmjobs plan`'s fits check. None: "
        "from the node selector nvidia.com/gpu.product (e.g. NVIDIA-A100-SXM4-80GB), else 80 "
        "assumed (the plan says so).")
    nodes: int = Field(1, ge=1, description="Nodes for training; >1 launches a TrainJob.")
    trainer: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob", description="What runs multi-node training (nodes > 1): a Kubeflow Trainer "
        "v2 TrainJob (trainer.kubeflow.org/v1alpha1), or a PyTorchJob (kubeflow.org/v1) on "
        "clusters with the training-operator v1.")
    training_runtime: str = Field(
        "torch-distributed", description="ClusterTrainingRuntime a TrainJob runs on. Ranks "
        "start with torchrun (DeepSpeed runs inside it, see train.deepspeed), so it must be a "
        "torch-policy runtime such as torch-distributed; the MPI-based deepspeed-distributed "
        "and mpi-distributed runtimes launch over SSH and are refused.")
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
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain (non-secret) environment variables for every stage pod, e.g. "
        "MMJOBS_STORE, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI. Credentials never go here: "
        "they come from the Secrets named in `secrets`.")
    retries: int = Field(
        2, ge=0, le=10, description="Retries of stages that resume after a pod is preempted "
        "(train, infer, pretokenize); other stages get 0 unless cluster.stages sets them.")
    caching: bool = Field(True, description="Let KFP reuse a step's result when its inputs "
                          "are unchanged (stages also skip work whose committed output matches).")
    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="Per-stage resources, keyed by stage kind (train, infer, ...) or by step "
        "name (sft, align-table, ...); a step's entry wins over its stage kind's, which wins "
        "over the cluster-wide values above.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_to_str(cls, value: Any) -> Any:
        return _quantity(value)

    @field_validator("training_runtime")
    @classmethod
    def _torch_runtime(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value):
            raise PydanticCustomError("runtime_name", "'{value}' is not a Kubernetes object "
                                      "name", {"value": value})
        if value in MPI_RUNTIMES:
            raise PydanticCustomError(
                "mpi_runtime", "'{value}' is an MPI runtime (an SSH launcher starts the ranks); "
                "mmjobs starts its ranks with torchrun: use torch-distributed (DeepSpeed runs "
                "inside it with train.deepspeed)", {"value": value})
        return value

    @field_validator("env")
    @classmethod
    def _plain_env(cls, env: dict[str, str]) -> dict[str, str]:
        # Secret-looking *keys* are already refused for the whole recipe at load time
        # (config_errors.find_credential_keys); values can still carry credentials in URLs.
        bad = [key for key, value in env.items() if _URL_USERINFO.search(value)]
        if bad:
            raise PydanticCustomError(
                "credential_in_url", "{keys}: a URL with user:password@ holds a credential; "
                "put it in a Kubernetes Secret (cluster.secrets names it) and keep the plain "
                "URL here", {"keys": ", ".join(bad)})
        return env


class ImagesConfig(StrictModel):
    """Container images the stages run in on a cluster: `<repository>:<tag>`."""

    data: str = Field("ghcr.io/mmjobs/mmjobs-data", description="Image repository for data "
                      "stages (prepare, mix, pretokenize, make-tiny-model).")
    train: str = Field("ghcr.io/mmjobs/mmjobs-train", description="Image repository for model "
                       "stages (train, apply-connector, build-moe-connector, merge).")
    eval: str = Field("ghcr.io/mmjobs/mmjobs-eval", description="Image repository for "
                      "evaluation stages (infer, evaluate, report).")
    tag: str | None = Field(None, description="Tag of all three; default: the mmjobs version.")

    def image(self, kind: Literal["data", "train", "eval"]) -> str:
        """The full image reference for an image kind, e.g. `ghcr.io/mmjobs/mmjobs-train:0.1.0`."""
        from mmjobs import __version__

        return f"{getattr(self, kind)}:{self.tag or __version__}"


class PlanConfig(StrictModel):
    """Settings only `mmjobs plan` reads (a real-size dry run); no pipeline step uses them."""

    config_from: str | None = Field(
        None, description="A hub id or directory whose config.json has the architecture of "
        "model.name_or_path, for a base model plan cannot read where it runs (a store URI "
        "built by another pipeline), e.g. liuhaotian/llava-v1.5-7b. Never loads weights.")


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
    train: TrainDefaults = Field(  # type: ignore[valid-type]
        default_factory=TrainDefaults,
        description="Training defaults shared by the pipeline's train steps (e.g. align and "
        "sft): each step takes the settings its mode has, and its stages.<step>.train section "
        "wins over them. Settings no train step of the pipeline has are errors. The settings "
        "of each mode: mmjobs.train.methods (README: Training).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Kubernetes resources."
    )
    pipeline: str | None = Field(
        None, validate_default=True,
        description="Which pipeline runs this recipe (a name in pipelines.PIPELINES, e.g. "
        "chartmoe); defaults to the recipe name.")
    images: ImagesConfig = Field(default_factory=ImagesConfig,
                                 description="Stage images for cluster runs.")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-step settings, keyed by the pipeline's step names (e.g. prepare, "
        "align, sft, infer). Each is checked against its stage's config (e.g. the train "
        "stage's for sft) without the fields the pipeline wires (inputs, outputs, run ids); "
        "see `mmjobs.pipeline_runner.check_stages`. Values here win over the recipe-level "
        "model/data/train/eval defaults.")
    sweep: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings a sweep pipeline fans out over (lavin-sweep): kebab-case setting "
        "name -> overrides of the swept step's section, e.g. {cyclical-lr: {train: "
        "{lr_schedule: cyclic_triangular2}}}. Checked like `stages` sections.")

    plan: PlanConfig = Field(default_factory=PlanConfig, description="What `mmjobs plan` "
                             "needs besides the rest of the recipe.")
    imports: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Inputs the pipeline copies into the store before any other step: "
        "kebab-case name -> an import step's settings (source: hub id, URL or store path; to: "
        "the store URI the recipe then names in model/data/stages; revision, include, sha256, "
        "...: see `mmjobs import --help`). Each runs as step `import-<name>`; an identical "
        "earlier import is reused.")

    @field_validator("sweep", "imports")
    @classmethod
    def _kebab_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in value if not re.fullmatch(_KEBAB, name)]
        if bad:  # setting names become output folders and KFP task names
            raise PydanticCustomError("kebab_case", "names must be kebab-case, got "
                                      "{bad}", {"bad": ", ".join(map(repr, bad))})
        return value

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

    @field_validator("pipeline")
    @classmethod
    def _default_pipeline(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not re.fullmatch(_KEBAB, value):
            raise PydanticCustomError("kebab_case", "must be a kebab-case pipeline name, e.g. "
                                      "'chart-demo'")
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
