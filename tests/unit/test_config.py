"""Specification of recipe loading: defaults, every error message shape, overrides, dumping."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mmjobs.config import ConfigError, DataConfig, dump_recipe, flatten, load_config
from mmjobs.config_errors import is_credential_key
from mmjobs.recipe import RecipeConfig, load_recipe, validate_main
from mmjobs.train.methods import SftConfig, TrainConfig

MINIMAL = """\
recipe: chart-demo
model:
  name_or_path: tiny-vlm
"""
CREDENTIAL_HINT = (
    "credentials are never read from recipe files; put them in the environment or a "
    "Kubernetes Secret (cluster.secrets names it)"
)
LR_NOT_A_NUMBER = "got 'fast' — Input should be a valid number, unable to parse string as a number"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return info.value.errors


# --- valid recipes and defaults -------------------------------------------------------------


def test_minimal_recipe_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_recipe(write(tmp_path, MINIMAL))

    assert cfg.recipe == "chart-demo"
    assert cfg.experiment == "chart-demo"  # defaults to the recipe name
    assert cfg.model.name_or_path == "tiny-vlm"
    assert cfg.model.trust_remote_code is False
    assert cfg.model.dtype == "auto"
    assert cfg.data is None
    assert "mode" not in type(cfg.train).model_fields  # each train step sets its own
    assert cfg.train.finetune == "lora"
    assert cfg.train.lr == 2e-4
    assert cfg.train.lr_schedule == "cosine"
    assert cfg.train.lora.r == 8
    assert cfg.train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.eval.benchmarks == []
    assert cfg.cluster.gpus == 0
    assert cfg.cluster.shm_size == "16Gi"
    assert cfg.cluster.secrets.s3 == "mmjobs-s3"
    assert cfg.cluster.secrets.mlflow == "mmjobs-mlflow"


def test_explicit_experiment_is_kept(tmp_path: Path) -> None:
    cfg = load_recipe(write(tmp_path, MINIMAL + "experiment: charts-2025\n"))
    assert cfg.experiment == "charts-2025"


def test_yaml_floats_without_a_dot_and_integer_quantities_are_accepted(tmp_path: Path) -> None:
    # PyYAML reads `2e-5` as a string and `cpu: 8` as an int; both must still work.
    text = MINIMAL + "train:\n  lr: 2e-5\ncluster:\n  cpu: 8\n  memory: 64Gi\n"
    cfg = load_recipe(write(tmp_path, text))
    assert cfg.train.lr == 2e-05
    assert cfg.cluster.cpu == "8"


def test_assignment_is_validated() -> None:
    cfg = SftConfig()
    with pytest.raises(ValueError, match="Input should be 'full', 'lora' or 'mma'"):
        cfg.finetune = "half"  # type: ignore[assignment]


# --- error messages -------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lrr: 0.1\n")
    assert errors_of(path) == ["train.lrr: unknown key; did you mean 'lr'?"]


def test_unknown_key_without_close_match_lists_allowed_fields(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "eval:\n  foo: 1\n")
    assert errors_of(path) == [
        "eval.foo: unknown key; allowed: benchmarks, batch_size, max_new_tokens, baseline, "
        "engine"
    ]


def test_nested_unknown_key_suggests_single_letter_field(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lora:\n    rnk: 16\n")
    assert errors_of(path) == ["train.lora.rnk: unknown key; did you mean 'r'?"]


def test_top_level_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "trian:\n  lr: 0.1\n")
    assert errors_of(path) == ["trian: unknown key; did you mean 'train'?"]


def test_wrong_type_shows_value_and_pydantic_message(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lr: fast\n")
    assert errors_of(path) == [f"train.lr: {LR_NOT_A_NUMBER}"]


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lr_schedule: cosin\n")
    assert errors_of(path) == [
        "train.lr_schedule: got 'cosin' — Input should be 'cosine', 'linear', 'constant', "
        "'cyclic_triangular', 'cyclic_triangular2', 'step' or 'exponential'"
    ]


def test_out_of_range_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "data:\n  source_format: llava\n  max_reject_fraction: 2\n")
    assert errors_of(path) == [
        "data.max_reject_fraction: got 2 — Input should be less than or equal to 1"
    ]


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe: chart-demo\nmodel:\n  dtype: bfloat16\n")
    assert errors_of(path) == ["model.name_or_path: required field missing"]


def test_recipe_name_must_be_kebab_case(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe: Chart_Demo\nmodel:\n  name_or_path: x\n")
    assert errors_of(path) == [
        "recipe: got 'Chart_Demo' — must be kebab-case: lowercase letters, digits and '-', "
        "e.g. 'chart-demo'"
    ]


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        recipe: chart-demo
        model:
          dtype: fp8
        train:
          lr: fast
          lrr: 0.1
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    err = info.value

    assert err.errors == [
        "model.name_or_path: required field missing",
        "model.dtype: got 'fp8' — Input should be 'auto', 'float32', 'bfloat16' or 'float16'",
        f"train.lr: {LR_NOT_A_NUMBER}",
        "train.lrr: unknown key; did you mean 'lr'?",
    ]
    assert str(err).splitlines() == [f"{path}: 4 errors", *(f"  {e}" for e in err.errors)]
    assert pickle.loads(pickle.dumps(err)).errors == err.errors  # crosses process boundaries


def test_single_error_header_is_singular(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).splitlines()[0] == f"{path}: 1 error"


# --- credentials ----------------------------------------------------------------------------


def test_credential_key_is_rejected_without_echoing_the_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "cluster:\n  aws_secret_access_key: AKIAEXAMPLE\n  gpus: many\n",
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(path)

    assert info.value.errors == [
        f"cluster.aws_secret_access_key: {CREDENTIAL_HINT}",
        "cluster.gpus: got 'many' — Input should be a valid integer, unable to parse string "
        "as an integer",
    ]
    assert "AKIAEXAMPLE" not in str(info.value)


def test_credential_nested_in_a_wrong_value_is_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe: a\nmodel:\n  name_or_path:\n    hf_token: hf_SECRET\n")
    errors = errors_of(path)
    assert errors == [
        f"model.name_or_path.hf_token: {CREDENTIAL_HINT}",
        "model.name_or_path: got <redacted> — Input should be a valid string",
    ]


def test_secret_names_under_cluster_secrets_are_accepted(tmp_path: Path) -> None:
    text = MINIMAL + "cluster:\n  secrets:\n    s3: team-minio\n    mlflow: team-mlflow\n"
    cfg = load_recipe(write(tmp_path, text))
    assert cfg.cluster.secrets.s3 == "team-minio"
    assert cfg.cluster.secrets.mlflow == "team-mlflow"


@pytest.mark.parametrize(
    "key",
    ["aws_secret_access_key", "secret", "client_secret", "password", "db_passwd", "hf_token",
     "token", "api_key", "apiKey", "AWS_ACCESS_KEY_ID", "credentials", "private_key"],
)  # fmt: skip
def test_credential_key_names(key: str) -> None:
    assert is_credential_key(key)


@pytest.mark.parametrize(
    "key",
    ["secrets", "max_new_tokens", "num_image_tokens", "pad_token", "tokenizer", "s3", "lr"],
)
def test_non_credential_key_names(key: str) -> None:
    assert not is_credential_key(key)


# --- overrides ------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_and_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_recipe(
        path, ["train.lr=2e-5", "train.lora.r=16", "eval.benchmarks=[mme, gqa]", "train.seed=7"]
    )
    assert cfg.train.lr == 2e-05
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lora.r == 16
    assert cfg.eval.benchmarks == ["mme", "gqa"]
    assert cfg.train.seed == 7


def test_later_override_wins(tmp_path: Path) -> None:
    cfg = load_recipe(write(tmp_path, MINIMAL), ["train.lr=0.1", "train.lr=0.2"])
    assert cfg.train.lr == 0.2


def test_override_replaces_bad_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lr: fast\n")
    assert load_recipe(path, ["train.lr=1e-4"]).train.lr == 1e-4


def test_override_bad_type_is_attributed_to_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert errors_of(path, ("train.lr=fast",)) == [f"--set train.lr=fast: {LR_NOT_A_NUMBER}"]


def test_override_unknown_path_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert errors_of(path, ("train.lrr=1",)) == [
        "--set train.lrr=1: unknown key; did you mean 'lr'?"
    ]
    assert errors_of(path, ("train.lora.rnk=4",)) == [
        "--set train.lora.rnk=4: unknown key; did you mean 'r'?"
    ]


def test_override_into_a_scalar_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert errors_of(path, ("train.lr.x=1",)) == ["--set train.lr.x=1: train.lr has no sub-keys"]


def test_malformed_override(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert errors_of(path, ("trainlr",)) == ["--set trainlr: expected KEY=VALUE"]
    assert errors_of(path, ("train..lr=1",)) == ["--set train..lr=1: expected KEY=VALUE"]


def test_override_creates_a_missing_section(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_recipe(path, ["data.input=s3://bucket/raw", "data.source_format=aihub-chart"])
    assert cfg.data == DataConfig(source_format="aihub-chart", input="s3://bucket/raw")


def test_override_into_free_form_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "cluster:\n  node_selector: {zone: a}\n")
    cfg = load_recipe(path, ["cluster.node_selector.pool=a100"])
    assert cfg.cluster.node_selector == {"zone": "a", "pool": "a100"}


def test_override_credential_is_rejected_without_echoing_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    errors = errors_of(path, ("cluster.hf_token=hf_SECRET", "cluster={password: pw}"))
    assert errors == [
        f"--set cluster.hf_token=***: {CREDENTIAL_HINT}",
        f"--set cluster=*** (cluster.password): {CREDENTIAL_HINT}",
    ]


def test_override_naming_a_secret_under_secrets_is_a_name_not_a_credential(
        tmp_path: Path) -> None:
    """As in files: keys directly under `secrets` name Kubernetes Secrets; deeper ones, and a
    credential-looking key anywhere else, are still refused."""
    path = write(tmp_path, MINIMAL)
    cfg = load_recipe(path, ["eval.engine={image: vllm/vllm-openai:v0.11.0}",
                             "eval.engine.secrets.api_key=team-engine-key"])
    assert cfg.eval.engine is not None and cfg.eval.engine.secrets.api_key == "team-engine-key"
    assert errors_of(path, ("eval.engine.secrets.api_key.token=x",)) == [
        f"--set eval.engine.secrets.api_key.token=***: {CREDENTIAL_HINT}"]


def test_file_and_override_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  lrr: 1\n")
    errors = errors_of(path, ("eval.batch_size=big", "nope"))
    assert errors == [
        "train.lrr: unknown key; did you mean 'lr'?",
        "--set eval.batch_size=big: got 'big' — Input should be a valid integer, unable to "
        "parse string as an integer",
        "--set nope: expected KEY=VALUE",
    ]


# --- file-level errors ----------------------------------------------------------------------


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe: a\nmodel:\n  name_or_path: x\n   bad: indent\n")
    assert errors_of(path) == [
        f"{path}: invalid YAML at line 4, column 7: mapping values are not allowed here"
    ]


def test_yaml_error_and_override_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe: [a\n")
    errors = errors_of(path, ("train.lrr=1",))
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}: invalid YAML at line 2, column 1: ")
    assert errors[1] == "--set train.lrr=1: unknown key; did you mean 'lr'?"


def test_top_level_list_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "- recipe: a\n")
    assert errors_of(path) == [
        f"{path}: expected a mapping of keys (recipe:, description:, experiment:, model:, "
        "data:, train:, eval:, cluster:, pipeline:, images:, stages:, sweep:, plan:, imports:, "
        "conversions:) at the top, got a list"
    ]


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert errors_of(path)[0].endswith("at the top, got an empty file")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    (error,) = errors_of(path)
    # Neither a file nor a bundled recipe's name: the names are listed (tests/unit/test_console
    # covers the did-you-mean suggestions).
    assert error.startswith("no such recipe file or bundled recipe name; bundled recipes: ")
    assert "chart-demo" in error


# --- generic loader, dump, flatten ------------------------------------------------------------


def test_load_config_accepts_a_mapping_and_does_not_modify_it() -> None:
    data = {"lr": 0.1, "lora": {"r": 4}}
    cfg = load_config(TrainConfig, data, ["lora.r=32"])
    assert cfg.lora.r == 32
    assert data == {"lr": 0.1, "lora": {"r": 4}}
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, {"lrr": 1}, source="train-stage")
    assert str(info.value).splitlines() == [
        "train-stage: 1 error",
        "  lrr: unknown key; did you mean 'lr'?",
    ]


def test_dump_round_trips(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """\
        description: 차트 데모
        data: {source_format: synthetic-charts, input: s3://b/x}
        train: {lr: 2e-5, lora: {modules_to_save: [mm_projector]}}
        eval: {benchmarks: [chartqa]}
        cluster: {gpus: 2, node_selector: {pool: a100}, tolerations: [{key: gpu, operator: Exists}]}
        """
    )
    cfg = load_recipe(write(tmp_path, text))
    dumped = dump_recipe(cfg)
    again = load_recipe(write(tmp_path, dumped, name="dumped.yaml"))

    assert again == cfg
    assert isinstance(yaml.safe_load(dumped)["train"]["lr"], float)  # no str '2e-05' on disk
    assert "차트 데모" in dumped


def test_flatten_gives_dotted_scalar_params(tmp_path: Path) -> None:
    text = MINIMAL + "eval: {benchmarks: [mme, gqa]}\ncluster: {node_selector: {pool: a100}}\n"
    flat = flatten(load_recipe(write(tmp_path, text)))

    assert flat["recipe"] == "chart-demo"
    assert flat["model.name_or_path"] == "tiny-vlm"
    assert flat["train.lr"] == 2e-4
    assert flat["train.lora.r"] == 8
    assert flat["train.lora.target_modules"] == '["q_proj", "k_proj", "v_proj", "o_proj"]'
    assert flat["eval.benchmarks"] == '["mme", "gqa"]'
    assert flat["cluster.node_selector"] == '{"pool": "a100"}'
    assert flat["cluster.secrets.s3"] == "mmjobs-s3"
    assert flat["data"] == "null"
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert json.loads(flat["cluster.tolerations"]) == []


def test_every_field_has_a_description() -> None:
    def walk(model_cls: type[BaseModel]) -> None:
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{model_cls.__name__}.{name}"
            nested = field.annotation
            for candidate in (nested, *getattr(nested, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate)

    walk(RecipeConfig)


# --- validate_main --------------------------------------------------------------------------


def test_validate_main_all_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, MINIMAL, name="a.yaml")
    b = write(tmp_path, MINIMAL.replace("chart-demo", "other"), name="b.yaml")

    assert validate_main([a, b], ["train.lr=1e-5"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"OK {a} (recipe chart-demo)", f"OK {b} (recipe other)"]
    assert err == ""


def test_validate_main_reports_invalid_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, MINIMAL, name="good.yaml")
    bad = write(tmp_path, MINIMAL + "train:\n  lrr: 1\n", name="bad.yaml")

    assert validate_main([good, bad]) == 1
    out, err = capsys.readouterr()
    assert out == f"OK {good} (recipe chart-demo)\n"
    assert err == f"{bad}: 1 error\n  train.lrr: unknown key; did you mean 'lr'?\n"
