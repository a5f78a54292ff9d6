"""Per-method train configs: one class per mode, errors named per field, stable fingerprints.

Config only (no model loading, no torch): these run in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from mmjobs.config import ConfigError, load_config
from mmjobs.recipe import load_recipe
from mmjobs.stage_contract import fingerprint
from mmjobs.stages.train import TrainStageConfig
from mmjobs.train.methods import (
    METHODS,
    TRAIN_MODES,
    AlignConfig,
    DpoConfig,
    GrpoConfig,
    PpoConfig,
    RmConfig,
    SftConfig,
    TrainConfig,
    TrainDefaults,
    defaults_for,
    fingerprinted_settings,
    settings_table,
    train_config,
    unused_defaults,
)

REPO = Path(__file__).resolve().parents[3]
KEYWORD = {"kind": "keyword", "keywords": ["x"]}
STAGE = {"model": {"name_or_path": "m"}, "data": "s3://b/shards"}


def errors(data: dict, overrides: list[str] | None = None, model=TrainConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(model, data, overrides or [])
    return info.value.errors


def test_each_mode_validates_into_its_own_class():
    assert TRAIN_MODES == ("align", "sft", "dpo", "rm", "ppo", "grpo")
    classes = [AlignConfig, SftConfig, DpoConfig, RmConfig, PpoConfig, GrpoConfig]
    assert list(METHODS.values()) == classes
    for mode, cls in METHODS.items():
        extra = {"rl": {"reward": KEYWORD}} if mode in ("ppo", "grpo") else {}
        cfg = load_config(TrainConfig, {"mode": mode, **extra})
        assert type(cfg) is cls and cfg.mode == mode
    assert type(load_config(TrainConfig, {})) is SftConfig  # no mode: sft, as before
    assert type(train_config(mode="rm", finetune="full")) is RmConfig
    # Each class holds only its own settings.
    assert "lora" not in AlignConfig.model_fields and "rl" not in DpoConfig.model_fields
    assert "eval_every_steps" not in PpoConfig.model_fields
    assert "scale_rewards" not in PpoConfig.model_fields["rl"].annotation.model_fields
    assert "vf_coef" not in GrpoConfig.model_fields["rl"].annotation.model_fields
    assert list(RmConfig.model_fields["preference"].annotation.model_fields) == [
        "rm_center_rewards_coef", "rm_regularization"]


def test_settings_of_another_mode_are_named_with_the_modes_they_belong_to():
    assert errors({"mode": "dpo", "rl": {"kl_coef": 0.1}}) == [
        "rl: not a setting of mode dpo (it is for ppo, grpo); remove it"]
    assert errors({"mode": "align", "finetune": "full", "lora": {"r": 4}}) == [
        "finetune: not a setting of mode align (it is for sft, dpo, rm, ppo, grpo); remove it",
        "lora: not a setting of mode align (it is for sft, dpo, rm, ppo, grpo); remove it"]
    assert errors({"mode": "ppo", "eval_every_steps": 5, "rl": {"reward": KEYWORD}}) == [
        "eval_every_steps: not a setting of mode ppo (it is for align, sft, dpo, rm); remove it"]
    assert errors({"mode": "dpo", "preference": {"rm_center_rewards_coef": 0.1}}) == [
        "preference.rm_center_rewards_coef: not a setting of mode dpo (it is for rm); remove it"]
    assert errors({"mode": "grpo", "rl": {"vf_coef": 0.5, "reward": KEYWORD}}) == [
        "rl.vf_coef: not a setting of mode grpo (it is for ppo); remove it"]
    # Keys no mode has get the chosen mode's suggestions; a bad mode lists the modes.
    assert errors({"mode": "rm", "preferense": {}}) == [
        "preferense: unknown key; did you mean 'preference'?"]
    assert errors({"mode": "sfft"}) == [
        "mode: got 'sfft' — choose one of align, sft, dpo, rm, ppo, grpo"]


def test_the_train_stage_names_inputs_its_mode_does_not_take():
    for mode in ("ppo", "grpo"):
        assert errors({**STAGE, "eval_data": "s3://b/held-out",
                       "train": {"mode": mode, "rl": {"reward": KEYWORD}}},
                      model=TrainStageConfig) == [
            f"eval_data: train.mode {mode} has no eval pass (each step logs its responses' "
            "reward and KL); remove it"]
    assert errors({**STAGE, "train": {"mode": "dpo", "rl": {"ptx_coef": 1.0}}},
                  model=TrainStageConfig) == [
        "train.rl: not a setting of mode dpo (it is for ppo, grpo); remove it"]
    ok = load_config(TrainStageConfig, {**STAGE, "eval_data": "s3://b/e", "train": {"mode": "rm"}})
    assert isinstance(ok.train, RmConfig)


def test_overrides_are_checked_against_the_chosen_mode():
    got = errors(STAGE, ["train.mode=dpo", "train.preference.betta=0.2", "train.lr=fast",
                         "train.rl.kl_coef=0.1"], model=TrainStageConfig)
    assert got == [
        "--set train.preference.betta=0.2: unknown key; did you mean 'beta'?",
        "--set train.lr=fast: got 'fast' — Input should be a valid number, unable to parse "
        "string as a number",
        "--set train.rl.kl_coef (train.rl): not a setting of mode dpo (it is for ppo, grpo); "
        "remove it"]
    assert errors(STAGE, ["train.warmup_ratoi=0.1"], model=TrainStageConfig) == [
        "--set train.warmup_ratoi=0.1: unknown key; did you mean 'warmup_ratio'?"]
    cfg = load_config(TrainStageConfig, STAGE, ["train.mode=grpo", "train.rl.num_generations=4",
                                                "train.rl.reward.kind=length"])
    assert isinstance(cfg.train, GrpoConfig) and cfg.train.rl.num_generations == 4


def test_combination_problems_are_one_line_each_naming_the_setting():
    assert errors({"mode": "dpo", "finetune": "full", "deepspeed": "zero3",
                   "preference": {"reference": "frozen_copy", "loss": "ipo",
                                  "label_smoothing": 0.1}}) == [
        "preference.label_smoothing: applies to the sigmoid loss (conservative DPO); remove it "
        "or use preference.loss: sigmoid",
        "preference.reference: frozen_copy keeps a whole second model on every GPU, which "
        "ZeRO-3 is meant to avoid; use finetune: lora with reference: implicit_lora, or "
        "deepspeed: zero2"]
    # ppo/grpo keep their frozen reference (and reward model) whole next to a ZeRO-3 actor,
    # as Align-Anything's PPO does (its ds_z3_config); `mmjobs plan` counts the copies.
    load_config(TrainStageConfig, {**STAGE, "train": {
        "mode": "ppo", "finetune": "full", "deepspeed": "zero3", "rl": {"reward": KEYWORD}}})


def test_a_dump_without_defaults_keeps_the_mode():
    # Multi-node job configs are dumped without defaults; the mode must survive.
    cfg = load_config(TrainStageConfig, {**STAGE, "train": {"mode": "dpo"}})
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    assert dumped["train"] == {"mode": "dpo"}
    assert isinstance(load_config(TrainStageConfig, dumped).train, DpoConfig)


# Fingerprints of these settings computed by the all-modes TrainConfig before the split
# (`cfg.train.model_dump(exclude=...)` of mmjobs.stages.train at ef1a12a): results and
# checkpoints made then are still reused and resumed.
BEFORE_THE_SPLIT = [
    ({}, "17e947d72877b13f3c7a"),
    ({"finetune": "lora", "lr": 1e-3, "lora": {"r": 64, "alpha": 128},
      "layer_dropout": {"preset": "inc"}, "batching": "packed", "max_steps": 10,
      "checkpoint_every_steps": 5}, "d8ca93beef663b12a5a4"),
    ({"finetune": "full", "freeze_language_model": False, "deepspeed": "zero3",
      "lr_schedule": "step", "lr_schedule_options": {"gamma": 0.5}}, "48cdb4c685eb0acf651d"),
    ({"mode": "align", "lr": 1e-3, "max_steps": 150, "batching": "random",
      "eval_every_steps": 3}, "eb0827aac03fd20244b0"),
    ({"mode": "dpo", "preference": {"beta": 0.5, "loss": "ipo"}}, "87721ae48e640c2d793e"),
    ({"mode": "dpo", "finetune": "full", "deepspeed": "zero2",
      "preference": {"reference": "frozen_copy"}}, "fd016b933132fd484121"),
    ({"mode": "rm", "preference": {"rm_center_rewards_coef": 0.01}}, "a7b10db29ed0e77aeed8"),
    ({"mode": "rm"}, "e1cc05780da2b332dbb1"),
    ({"mode": "ppo", "rl": {"reward": KEYWORD, "max_new_tokens": 7}}, "7cf8495306c3842c124d"),
    ({"mode": "ppo", "finetune": "full", "deepspeed": "zero2",
      "rl": {"reward": {"kind": "model", "model": "s3://b/rm/final"}, "kl_coef": 0.5,
             "ptx_coef": 16.0, "num_generations": 2}}, "28dd5abcdea5de8ff370"),
    ({"mode": "grpo", "per_device_batch_size": 8, "rl": {"rollout_batch_size": 2,
                                                         "reward": KEYWORD}},
     "de6e9a16de545b52641c"),
    ({"mode": "grpo", "rl": {"num_generations": 4, "scale_rewards": False, "kl_coef": 0.05,
                             "reward": {"kind": "length", "unit": "tokens"}}},
     "22029b62c1f111475e15"),
]


@pytest.mark.parametrize(("settings", "expected"), BEFORE_THE_SPLIT)
def test_fingerprinted_settings_are_those_of_before_the_split(settings, expected):
    cfg = load_config(TrainConfig, settings)
    assert fingerprint(fingerprinted_settings(cfg)) == expected
    # A dump without defaults (multi-node job configs) fingerprints the same.
    again = load_config(TrainConfig, cfg.model_dump(mode="json", exclude_defaults=True))
    assert fingerprinted_settings(again) == fingerprinted_settings(cfg)


def test_recipe_train_defaults_hold_every_mode_and_each_step_takes_its_own():
    given = {"lr": 1e-4, "freeze_vision_tower": False, "eval_every_steps": 10,
             "preference": {"beta": 0.2, "rm_center_rewards_coef": 0.01},
             "rl": {"kl_coef": 0.05, "vf_coef": 0.2, "scale_rewards": False, "reward": KEYWORD}}
    defaults = TrainDefaults.model_validate(given)
    assert defaults.rl.num_generations is None  # per-mode default (ppo 1, grpo 8)
    assert "(modes ppo, grpo)" in TrainDefaults.model_fields["rl"].description
    assert defaults_for("align", given) == {"lr": 1e-4, "eval_every_steps": 10}
    assert defaults_for("rm", given) == {"lr": 1e-4, "freeze_vision_tower": False,
                                         "eval_every_steps": 10,
                                         "preference": {"rm_center_rewards_coef": 0.01}}
    assert defaults_for("grpo", given) == {"lr": 1e-4, "freeze_vision_tower": False,
                                           "rl": {"kl_coef": 0.05, "scale_rewards": False,
                                                  "reward": KEYWORD}}
    for mode in TRAIN_MODES:  # what a step takes is valid for its mode
        load_config(TrainConfig, {"mode": mode, **defaults_for(mode, given)})
    steps = {"align": "align", "sft": "sft", "rm": "rm"}
    assert unused_defaults(given, steps) == [
        ("preference.beta", "a setting of mode dpo only, and no train step here runs one "
                            "(train steps: align (align), sft (sft), rm (rm)); remove it, or "
                            "set it under stages.<step>.train"),
        ("rl", "a setting of mode ppo, grpo only, and no train step here runs one (train "
               "steps: align (align), sft (sft), rm (rm)); remove it, or set it under "
               "stages.<step>.train")]
    assert unused_defaults({"lr": 1.0}, {}) == [("lr", "this pipeline has no train step; "
                                                       "remove it")]


def test_a_recipe_level_mode_says_what_to_do(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("recipe: x\nmodel: {name_or_path: m}\ntrain: {mode: dpo}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.errors == [
        "train.mode: not a setting here: each train step of the pipeline sets its own mode "
        "(e.g. chart-demo's align and sft steps); remove it here (stages.<step>.train holds a "
        "step's own settings)"]


def test_every_setting_of_every_mode_has_a_description():
    def walk(model: type[BaseModel], where: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{where}.{name}"
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate, f"{where}.{name}")

    for mode, cls in METHODS.items():
        walk(cls, mode)
    walk(TrainDefaults, "recipe train")


def test_the_readme_shows_which_settings_each_mode_has():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, "README's table is out of date; paste settings_table()"


def test_train_help_lists_every_mode(capsys):
    from mmjobs.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "align | sft | dpo | rm | ppo | grpo" in text
    from mmjobs.stages.train import STAGE

    with pytest.raises(SystemExit):
        STAGE.cli(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert all(f"{mode}" in text for mode in TRAIN_MODES)
    assert "align (the connector alone), sft (full or LoRA), dpo and rm" in text


def test_a_separate_critic_needs_a_reward_model_and_leaves_vf_coef_alone():
    rm = {"kind": "model", "model": "s3://b/rm/final"}
    cfg = load_config(TrainConfig, {"mode": "ppo", "finetune": "full", "deepspeed": "zero2",
                                    "rl": {"critic": "reward_model", "critic_lr": 5e-6,
                                           "reward": rm}})
    assert (cfg.rl.critic, cfg.rl.critic_lr, cfg.rl.critic_lr_schedule) == (
        "reward_model", 5e-6, "constant")
    assert errors({"mode": "ppo", "rl": {"critic": "reward_model", "vf_coef": 0.5,
                                         "reward": KEYWORD}}) == [
        "rl.critic: reward_model initialises the critic from the reward model, but "
        "rl.reward.kind is keyword; use critic: value_head, or a reward model (kind: model)",
        "rl.vf_coef: weights the shared value head's loss; critic reward_model trains a "
        "separate model at rl.critic_lr instead; remove vf_coef"]
    assert errors({"mode": "grpo", "rl": {"critic": "reward_model", "reward": KEYWORD}}) == [
        "rl.critic: not a setting of mode grpo (it is for ppo); remove it"]


def test_settings_added_at_their_defaults_keep_earlier_fingerprints():
    # rm_regularization and the critic settings change nothing until set.
    for settings in ({"mode": "rm", "preference": {"rm_regularization": 0.0}},
                     {"mode": "ppo", "rl": {"reward": KEYWORD, "critic": "value_head",
                                            "critic_weight_decay": 0.0}}):
        plain = {k: v for k, v in settings.items() if k == "mode"}
        if settings["mode"] == "ppo":
            plain["rl"] = {"reward": KEYWORD}
        assert fingerprinted_settings(load_config(TrainConfig, settings)) == \
            fingerprinted_settings(load_config(TrainConfig, plain))
    set_ = load_config(TrainConfig, {"mode": "rm", "preference": {"rm_regularization": 1e-3}})
    assert fingerprinted_settings(set_)["preference"]["rm_regularization"] == 1e-3
