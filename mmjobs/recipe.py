"""The recipe: one YAML file (``pipelines/recipes/*.yaml``) validated by `RecipeConfig`.

A recipe combines the core's sections (`mmjobs.config`: model, data, eval, cluster, images)
with the training methods' settings (`mmjobs.train.methods`: the recipe-level `train:`
defaults), so it lives above the core and the components: the core knows no component, and a
component never needs the whole recipe. Its readers are the stages' declarations (the
defaults each takes from the recipe), the pipelines, the runner, `mmjobs plan` and the CLI.
Loading reports every problem at once in a `ConfigError`, for the file and the overrides
together.

Example::

    cfg = load_recipe("pipelines/recipes/chart-demo.yaml", ["train.lr=2e-5"])
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from mmjobs.config import ConfigError, DataConfig, EvalConfig, ModelConfig, load_config
from mmjobs.config_base import StrictModel
from mmjobs.config_cluster import ClusterConfig, ImagesConfig
from mmjobs.serve.engine_pod import EngineSpec
from mmjobs.train.methods import TrainDefaults

__all__ = ["EngineSpec", "PlanConfig", "RecipeConfig", "RecipeEvalConfig", "bundled_recipes",
           "conversation_format_defaults", "load_recipe", "remote_code_defaults",
           "resolve_recipe", "validate_main"]

# Recipe names end up in Kubernetes and KFP object names, which must be DNS-1123 labels.
_KEBAB = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class PlanConfig(StrictModel):
    """Settings only `mmjobs plan` reads (a real-size dry run); no pipeline step uses them."""

    config_from: str | None = Field(
        None, description="A hub id or directory whose config.json has the architecture of "
        "model.name_or_path, for a base model plan cannot read where it runs (a store URI "
        "built by another pipeline), e.g. liuhaotian/llava-v1.5-7b. Never loads weights.")


class RecipeEvalConfig(EvalConfig):
    """The recipe's `eval` section: the shared evaluation settings plus the serving engine
    pipelines evaluate through (a serve component's schema, hence here and not in the core)."""

    engine: EngineSpec | None = Field(
        None, description="Evaluate through a serving engine (vLLM, SGLang, TGI: any "
        "OpenAI-compatible server image) that the pipeline starts for each evaluated model "
        "before its infer steps and removes after; `mmjobs run` starts `mmjobs serve` on "
        "127.0.0.1 instead. See mmjobs.serve.engine_pod.")


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
    eval: RecipeEvalConfig = Field(default_factory=RecipeEvalConfig,
                                   description="Evaluation settings.")
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
        "stage's for sft) without the fields the pipeline wires (inputs, outputs, run ids) "
        "when the pipeline is built (`mmjobs validate`). Values here win over the "
        "recipe-level model/data/train/eval defaults.")
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
    conversions: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Checkpoints the pipeline converts after the imports and before every "
        "other step: kebab-case name -> a convert step's settings (source; kind auto|"
        "safetensors|llava; vision_tower and projector for LLaVA composed from vicuna + CLIP + "
        "mm_projector.bin; to: the store URI the recipe then names; see `mmjobs stage convert "
        "--help`). Each runs as step `convert-<name>`; an identical earlier conversion is "
        "reused. Pickles are read with torch.load(weights_only=True) only.")

    @field_validator("sweep", "imports", "conversions")
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


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load and validate a recipe (a YAML file, or a bundled recipe's name); raises
    `ConfigError` listing every problem."""
    return load_config(RecipeConfig, resolve_recipe(path), overrides)


def bundled_recipes() -> dict[str, Path]:
    """The recipes shipped with the pipelines (``pipelines/recipes/*.yaml``) by name: those of
    the working directory's checkout first, then the installed package's."""
    found: dict[str, Path] = {}
    folders = [Path("pipelines/recipes")]
    try:
        from importlib.resources import files

        folders.append(Path(str(files("pipelines") / "recipes")))
    except ModuleNotFoundError:  # an install without the pipelines package
        pass
    for folder in folders:
        for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found.setdefault(file.stem, file)
    return found


def resolve_recipe(path: str | Path) -> Path:
    """The recipe file `path` names: an existing file, or a bundled recipe's name
    (``chart-demo`` for ``pipelines/recipes/chart-demo.yaml``).

    Raises:
        ConfigError: neither; the message suggests the closest recipe names and files.
    """
    given = Path(path)
    if given.is_file():
        return given
    bundled = bundled_recipes()
    name = given.name.removesuffix(".yaml").removesuffix(".yml")
    if given.suffix in ("", ".yaml", ".yml") and str(given.parent) == "." and name in bundled:
        return bundled[name]
    if given.is_dir():
        raise ConfigError(str(path), ["is a directory; name a recipe file in it, e.g. "
                                      f"{given / 'chart-demo.yaml'}"])
    import difflib

    siblings = [p.name for p in given.parent.glob("*.y*ml")] if given.parent.is_dir() else []
    close = ([str(given.parent / f) for f in difflib.get_close_matches(given.name, siblings, n=3)]
             or difflib.get_close_matches(name, list(bundled), n=3, cutoff=0.5))
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"bundled recipes: {', '.join(bundled) or 'none (pipelines/ is not installed)'}")
    raise ConfigError(str(path), [f"no such recipe file or bundled recipe name; {hint}"])


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


# --------------------------------------------------------------------------- stage defaults


def remote_code_defaults(recipe: RecipeConfig, step: str = "") -> dict[str, Any]:
    """`trust_remote_code: true` when the recipe's model needs it (what stages loading the
    model take from the recipe), else nothing."""
    return {"trust_remote_code": True} if recipe.model.trust_remote_code else {}


def conversation_format_defaults(recipe: RecipeConfig) -> dict[str, Any]:
    """The recipe's `model.conversation_format` unless auto: training data and prompts must
    be rendered alike, so pretokenize, infer and serve all take it."""
    fmt = recipe.model.conversation_format
    return {"conversation_format": fmt} if fmt != "auto" else {}
