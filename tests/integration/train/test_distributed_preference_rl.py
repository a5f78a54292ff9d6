"""dpo, rm, grpo and ppo under DeepSpeed ZeRO-2 (and rm, ppo under ZeRO-3) with torchrun, 2 CPU
ranks, gloo.

Launched like `test_distributed.py` (whose rank entrypoint and recorder this reuses): every
rank records the trainable parameters it holds at the end and its per-step loss and gradient
norm. Claims:

- every mode: the ranks agree bit for bit (parameters, losses, gradient norms), the loss is
  finite, a checkpoint holding both ranks' RNG, data position and ZeRO optimizer partition is
  committed, and `final/` holds what the ranks hold;
- dpo and rm under ZeRO-2: two ranks equal one process on the same global batch (same
  micro-batches, `grad_accum=2`), as for sft in `test_distributed.py` (ZeRO-2 computes the
  clipping norm its own way; see there, and the rm note below);
- under ZeRO-3 (LoRA; parameters sharded) the exported value heads — gathered from the shards
  at export — equal what the ranks hold;
- grpo and ppo have no single-process twin: each rank samples its own rollouts from its own
  RNG stream, which one process cannot reproduce in one stream.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.integration.train.rl_fixtures import prompt_shards  # noqa: F401
from tests.integration.train.test_distributed import (
    LOSS_RTOL,
    STEPS,
    Run,
    _assert_final_adapter_is,
    _assert_ranks_agree,
    _in_process,
    _max_abs_diff,
    _settings,
    _torchrun,
    deepspeed_op,  # noqa: F401 - module fixture
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LORA = {"max_steps": STEPS, "per_device_batch_size": 2, "checkpoint_every_steps": 4,
        "keep_last_checkpoints": 2, "warmup_ratio": 0.0, "finetune": "lora", "lr": 1e-2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
MODES: dict[str, dict[str, Any]] = {
    "dpo": {"mode": "dpo", "preference": {"beta": 0.2}},
    "rm": {"mode": "rm"},
    "grpo": {"mode": "grpo", "rl": {"rollout_batch_size": 1, "num_generations": 4,
                                    "max_new_tokens": 4,
                                    "reward": {"kind": "keyword", "keywords": ["e"]}}},
    "ppo": {"mode": "ppo", "rl": {"rollout_batch_size": 2, "num_generations": 1,
                                  "ppo_epochs": 2, "max_new_tokens": 4,
                                  "reward": {"kind": "length", "unit": "chars",
                                             "min_length": 12, "max_length": 20}}},
}
RUNS = [(mode, "zero2") for mode in sorted(MODES)] + [("ppo", "zero3"), ("rm", "zero3")]


def _data(mode: str, request: pytest.FixtureRequest) -> str:
    if mode == "dpo":
        return request.getfixturevalue("dpo_shards")
    if mode == "rm":
        return request.getfixturevalue("rm_shards")[0]
    return request.getfixturevalue("prompt_shards")


def _assert_checkpoint_has_both_ranks(run: Run) -> None:
    from mmjobs import storage

    step = storage.join(str(run.output), "checkpoints", "step-4")
    files = {f.path for f in storage.read_manifest(step).files}
    for rank in (0, 1):
        assert {f"ranks/rank-{rank}/rng.pt", f"ranks/rank-{rank}/loader.json"} <= files
        assert any(f"zero_pp_rank_{rank}_" in f for f in files), sorted(files)


@pytest.mark.parametrize(("mode", "zero"), RUNS)
def test_two_ranks(mode, zero, request, tmp_path, tiny_llava_dir, deepspeed_op,  # noqa: F811
                   mlflow_db_template):
    data = _data(mode, request)
    train = {**LORA, **MODES[mode], "deepspeed": zero}
    run = _torchrun(tmp_path / "two", _settings(tiny_llava_dir, data, tmp_path / "two" / "out",
                                                train), nproc=2, deepspeed=True)
    _assert_ranks_agree(run)
    assert all(math.isfinite(loss) for loss in run.ranks[0].losses), run.ranks[0].losses
    _assert_checkpoint_has_both_ranks(run)
    if mode == "rm":
        head = load_file(str(run.output / "final" / "reward_model" / "value_head.safetensors"))
        assert head["weight"].equal(run.ranks[1].tensors["value_head.weight"])
    else:
        vlm = {k.removeprefix("vlm."): v for k, v in run.ranks[1].tensors.items()
               if not k.startswith("value_head.")}
        _assert_final_adapter_is(run, vlm)
    if mode in ("grpo", "ppo") or zero == "zero3":
        assert run.result["steps"] == STEPS
        if mode == "ppo":
            assert run.result["value_head"].endswith("final/value_head.safetensors")
            head = load_file(run.result["value_head"])
            assert head["weight"].equal(run.ranks[1].tensors["value_head.weight"])
        return
    # dpo, rm: one process, same per-device batch, grad_accum=2 = the same global batches.
    (tmp_path / "one").mkdir()
    single = _in_process(tmp_path / "one", _settings(
        tiny_llava_dir, data, tmp_path / "one" / "out", {**LORA, **MODES[mode],
                                                         "grad_accum": 2}),
        mlflow_db_template)
    ref = single.ranks[0]
    ours, theirs = dict(run.ranks[0].tensors), dict(ref.tensors)
    if mode == "rm":
        # The Bradley-Terry loss depends on r_chosen - r_rejected only, so the value head's
        # bias gets a zero gradient up to round-off (~1e-9), whose sign differs between the
        # two reduction orders — and AdamW's m / sqrt(v) turns any nonzero gradient into a
        # full lr-sized step. The bias is unidentifiable here (it cancels in every loss and
        # accuracy); observed: 0.0006 vs 0.0028 after 6 steps at lr 1e-2.
        for tensors in (ours, theirs):
            tensors.pop("value_head.bias")
    # dpo: 1e-6 as for sft (observed: 0.0, bit-identical). rm: the differing bias shifts
    # every reward by up to 2e-3, which changes the round-off of r_chosen - r_rejected (~1e-7
    # relative) and so of every gradient, and AdamW carries that into the LoRA weights:
    # observed 4.3e-6 after 6 steps, 0.04% of one step's update (~lr = 1e-2); a lost
    # micro-batch or a wrong pair count moves weights by ~lr.
    bound = 1e-5 if mode == "rm" else 1e-6
    diff = _max_abs_diff(ours, theirs)
    print(f"{mode}: ZeRO-2 (2 ranks) vs one process, max |dw| = {diff:.3g}")
    assert diff <= bound
    # rm's losses follow its weights (observed 1.8e-6 relative at step 5).
    assert run.ranks[0].losses == pytest.approx(ref.losses, rel=10 * LOSS_RTOL
                                                if mode == "rm" else LOSS_RTOL)
    assert run.ranks[0].grad_norms == pytest.approx(ref.grad_norms, rel=1e-5)


@pytest.fixture(scope="module")
def llava_reward_model(tmp_path_factory, tiny_llava_dir) -> str:
    """A full reward model export on the tiny LLaVA (a random head: the run's reward and
    the critic's starting point)."""
    import torch

    from mmjobs.config import ModelConfig
    from mmjobs.models.builder import load_model
    from mmjobs.train.methods import RmConfig
    from mmjobs.train.reward_model import RewardModel, export_reward_model

    out = tmp_path_factory.mktemp("llava-rm")
    spec = ModelConfig(name_or_path=str(tiny_llava_dir))
    loaded = load_model(spec, for_training=False)
    torch.manual_seed(0)
    export_reward_model(RewardModel(loaded.model), None, RmConfig(finetune="full"), out,
                        base_model=spec, processor=loaded.processor,
                        source_dir=loaded.model_dir, meta={"max_length": 256})
    return str(out)


def test_ppo_with_align_anythings_critic_under_zero3(tmp_path, tiny_llava_dir, prompt_shards,  # noqa: F811
                                                     deepspeed_op, llava_reward_model):  # noqa: F811
    """The chameleon recipe's PPO at real size: full fine-tuning under ZeRO-3 with a whole
    frozen reference and reward model on every rank and the critic, a copy of the reward
    model, sharded with the actor; export gathers both."""
    from mmjobs.train.reward_model import load_reward_model
    from tests.train_fixtures import read_tensors

    train = {**{k: v for k, v in LORA.items() if k != "lora"}, "finetune": "full",
             "lr": 1e-3, "deepspeed": "zero3", "mode": "ppo",
             "rl": {"rollout_batch_size": 2, "max_new_tokens": 4, "critic": "reward_model",
                    "critic_lr": 2e-3,
                    "reward": {"kind": "model", "model": llava_reward_model}}}
    run = _torchrun(tmp_path / "two", _settings(tiny_llava_dir, prompt_shards,
                                                tmp_path / "two" / "out", train),
                    nproc=2, deepspeed=True)
    _assert_ranks_agree(run)
    assert all(math.isfinite(loss) for loss in run.ranks[0].losses), run.ranks[0].losses
    _assert_checkpoint_has_both_ranks(run)
    assert run.result["steps"] == STEPS
    held = run.ranks[1].tensors
    critic = {k.removeprefix("critic."): v for k, v in held.items() if k.startswith("critic.")}
    actor = {k.removeprefix("vlm."): v for k, v in held.items() if k.startswith("vlm.")}
    assert critic and actor and not any(k.startswith("value_head.") for k in held)
    # Two models: after training no shared decoder weight is equal.
    shared = [k for k in actor if f"vlm.{k}" in critic and ".layers." in k]
    assert shared and not [k for k in shared if actor[k].equal(critic[f"vlm.{k}"])]
    # The export holds what the ranks hold, gathered from the shards.
    assert run.result["critic"].endswith("final/critic/reward_model")
    exported = read_tensors(run.result["critic"])
    assert exported["value_head.safetensors:weight"].equal(critic["value_head.weight"])
    loaded = load_reward_model(run.result["critic"]).state_dict()
    for name in shared:
        assert loaded[f"vlm.{name}"].float().equal(critic[f"vlm.{name}"].float()), name
