"""The train stage under torchrun (2 CPU ranks, gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each launch runs this module as the rank entrypoint (`python -m torch.distributed.run
--standalone --nproc_per_node 2 -m tests.integration.train.test_distributed --config F`): the
`__main__` block below wraps two trainer functions and then runs the real stage CLI
(`mmjobs.stages.train.STAGE.cli`). The wrappers only record: every rank writes the trainable
parameters it holds when training ends (ZeRO-3 shards gathered) and the loss and gradient
norm it computed at each step. That is how the test sees rank 1 at all: the stage logs,
commits and prints on rank 0 only.

Two claims per mode:

(a) the ranks agree — bit for bit on the final parameters, the gradient norms and losses, and
    rank 0's committed `final/` holds exactly what rank 1 holds; each rank committed its own
    RNG and data position into the checkpoint;
(b) distributed training equals single-process training on the same global batch: one
    process with the same per-device batch and `grad_accum=2` sees the same micro-batches
    (the sampler deals global batch k to rank k mod 2; one process takes them in order) and
    normalises by the same count (the assistant tokens of the whole step), so its gradient is
    the same sum. See each test for the tolerance and why it holds.

LoRA dropout is 0: every rank is seeded alike, so with dropout the two ranks would draw the
same masks where one process draws fresh ones for its second micro-batch. Threads are pinned
to one per process (2 shared cores; and one thread count is part of being bit-reproducible).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
DUMP_ENV = "MMJOBS_TEST_RANK_DUMP"

# 16 samples at 2 per rank: 4 steps per epoch, so 6 steps cross an epoch boundary; a
# checkpoint at step 4 records both ranks' data positions at that boundary.
STEPS = 6
COMMON = {"max_steps": STEPS, "per_device_batch_size": 2, "checkpoint_every_steps": 4,
          "keep_last_checkpoints": 2, "warmup_ratio": 0.0}
LORA = {**COMMON, "finetune": "lora", "lr": 1e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
FULL = {**COMMON, "finetune": "full", "lr": 1e-3}
# Losses are sums of float32 token losses, added in another order when they come from two
# ranks (each rank sums its micro-batch, then a float64 all-reduce) than from one process
# (two micro-batches added in float32): a few float32 ulps, ~1e-7 relative at loss ~6.
LOSS_RTOL = 1e-6


# --------------------------------------------------------------------------- rank side


def install_rank_recorder(directory: Path) -> None:
    """Make every rank write `rank-R.safetensors` (its trainable parameters at the end of
    training) and `rank-R.json` (its step losses and gradient norms) into `directory`."""
    from mmjobs.train import trainer

    steps: list[dict[str, float]] = []
    log_step, save_final = trainer.log_step, trainer.TrainRecipe.save_final

    def recording_log_step(run: Any, step: int, total: int, **kw: Any) -> Any:
        grad_norm = kw.get("grad_norm")
        steps.append({"step": step, "loss": kw["loss"],
                      "grad_norm": None if grad_norm is None else float(grad_norm)})
        return log_step(run, step, total, **kw)

    def recording_save_final(self: Any) -> dict[str, str]:
        from safetensors.torch import save_file

        model = self.accelerator.unwrap_model(self.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gathered: Any = contextlib.nullcontext()
        if self.cfg.deepspeed.startswith("zero3"):  # parameters are shards: gather them whole
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p for _, p in named])
        with gathered:
            tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
        rank = self.dist.rank
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / f"rank-{rank}.safetensors"))
        (directory / f"rank-{rank}.json").write_text(json.dumps(
            {"rank": rank, "world_size": self.dist.world_size, "steps": steps}))
        return save_final(self)

    trainer.log_step = recording_log_step
    trainer.TrainRecipe.save_final = recording_save_final


# --------------------------------------------------------------------------- test side


@dataclass
class RankRecord:
    tensors: dict[str, Any]
    losses: list[float]
    grad_norms: list[float]


@dataclass
class Run:
    """What one training run left: per-rank records, the stage result, its output."""

    ranks: list[RankRecord]
    result: dict[str, Any]
    output: Path


def _read_ranks(directory: Path, world_size: int) -> list[RankRecord]:
    from safetensors.torch import load_file

    records = []
    for rank in range(world_size):
        info = json.loads((directory / f"rank-{rank}.json").read_text())
        assert info["rank"] == rank and info["world_size"] == world_size
        assert [s["step"] for s in info["steps"]] == list(range(1, STEPS + 1))
        records.append(RankRecord(load_file(str(directory / f"rank-{rank}.safetensors")),
                                  [s["loss"] for s in info["steps"]],
                                  [s["grad_norm"] for s in info["steps"]]))
    return records


def _settings(model_dir: Path, data: str, output: Path, train: dict[str, Any]) -> dict[str, Any]:
    return {"model": {"name_or_path": str(model_dir)}, "data": data, "output": str(output),
            "train": {"mode": "sft", "batching": "random", "dataloader_workers": 0, **train}}


def _torchrun(tmp: Path, settings: dict[str, Any], nproc: int, deepspeed: bool) -> Run:
    """Launch the train stage with torchrun; return the ranks' records and rank 0's result."""
    import yaml

    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           DUMP_ENV: str(tmp / "ranks"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
    if deepspeed:
        env["DS_ACCELERATOR"] = "cpu"
    # --standalone: a rendezvous on a free local port, so parallel sessions do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "tests.integration.train.test_distributed",
           "--config", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-2000:]  # rank 0 prints the result; others are quiet
    return Run(_read_ranks(tmp / "ranks", nproc), json.loads(lines[0]), Path(settings["output"]))


def _in_process(tmp: Path, settings: dict[str, Any], mlflow_db: Path) -> Run:
    """The single-process reference: the stage's `main` in this process, one thread."""
    import shutil

    import torch

    from mmjobs.config import load_config
    from mmjobs.stages.train import TrainStageConfig, main

    with pytest.MonkeyPatch.context() as mp:
        from mmjobs.train import trainer

        # install_rank_recorder assigns module attributes; let the monkeypatch undo them.
        mp.setattr(trainer, "log_step", trainer.log_step)
        mp.setattr(trainer.TrainRecipe, "save_final", trainer.TrainRecipe.save_final)
        shutil.copyfile(mlflow_db, tmp / "mlflow.db")  # module-scoped: no per-test env yet
        mp.setenv("MMJOBS_HOME", str(tmp / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        install_rank_recorder(tmp / "ranks")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = main(load_config(TrainStageConfig, settings))
        finally:
            torch.set_num_threads(threads)
    return Run(_read_ranks(tmp / "ranks", 1), result.model_dump(), Path(settings["output"]))


def _max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_ranks_agree(run: Run) -> None:
    from tests.train_fixtures import assert_tensors_equal

    first, second = run.ranks
    assert_tensors_equal(first.tensors, second.tensors)
    # Each rank computed these from its own gradients after synchronisation (DDP: torch's
    # clip_grad_norm_ on each rank; DeepSpeed: its all-reduced norm).
    assert first.grad_norms == second.grad_norms
    assert first.losses == second.losses


def _assert_checkpoint_has_both_ranks(run: Run, deepspeed: bool) -> None:
    from mmjobs import storage

    step = storage.join(str(run.output), "checkpoints", "step-4")
    files = {f.path for f in storage.read_manifest(step).files}
    for rank in (0, 1):
        assert {f"ranks/rank-{rank}/rng.pt", f"ranks/rank-{rank}/loader.json"} <= files
        # Each rank consumed exactly its 4 batches of epoch 0 by step 4.
        loader = json.loads(storage.read_text(storage.join(step, f"ranks/rank-{rank}/"
                                                                 "loader.json")))
        assert (loader["epoch"], loader["batch_index"]) == (1, 0), loader
        if deepspeed:  # ZeRO: every rank's optimizer partition
            assert any(f"zero_pp_rank_{rank}_" in f for f in files), sorted(files)


def _adapter_key(name: str) -> str:
    """peft's saved name of a parameter: no adapter name, modules_to_save unwrapped."""
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def _assert_final_adapter_is(run: Run, tensors: dict[str, Any]) -> None:
    from tests.train_fixtures import read_tensors

    saved = {k.split(":", 1)[1]: v for k, v in read_tensors(run.output / "final" /
                                                            "adapter").items()}
    expected = {_adapter_key(k): v for k, v in tensors.items()}
    assert sorted(saved) == sorted(expected)
    different = [k for k in saved if not saved[k].equal(expected[k])]
    assert not different, different[:3]


def _assert_final_model_is(run: Run, tensors: dict[str, Any]) -> None:
    from mmjobs.config import ModelConfig
    from mmjobs.models.builder import load_model

    model = load_model(ModelConfig(name_or_path=str(run.output / "final" / "model")),
                       for_training=False).model
    params = dict(model.named_parameters())
    different = [k for k, v in tensors.items() if not params[k].detach().equal(v)]
    assert not different, different[:3]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deepspeed_op() -> None:
    """Build (or load from the torch extensions cache) DeepSpeed's shared-memory CPU
    collective op once, so the first DeepSpeed launch does not pay the ~10-20 s C++ build
    inside its timeout, and both ranks do not race to build it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import "
                           "build_shm_op; build_shm_op()"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_llava_dir, chart_shards, mlflow_db_template) -> Run:
    tmp = tmp_path_factory.mktemp("ref-lora")
    return _in_process(tmp, _settings(tiny_llava_dir, chart_shards, tmp / "out",
                                      {**LORA, "grad_accum": 2}), mlflow_db_template)


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory, tiny_llava_dir, chart_shards, mlflow_db_template) -> Run:
    tmp = tmp_path_factory.mktemp("ref-full")
    return _in_process(tmp, _settings(tiny_llava_dir, chart_shards, tmp / "out",
                                      {**FULL, "grad_accum": 2}), mlflow_db_template)


# --------------------------------------------------------------------------- tests


def test_ddp_lora_equals_one_process_bit_for_bit(tmp_path, tiny_llava_dir, chart_shards,
                                                 lora_reference):
    run = _torchrun(tmp_path, _settings(tiny_llava_dir, chart_shards, tmp_path / "out", LORA),
                    nproc=2, deepspeed=False)
    _assert_ranks_agree(run)
    _assert_checkpoint_has_both_ranks(run, deepspeed=False)
    _assert_final_adapter_is(run, run.ranks[1].tensors)

    # Exact, not approximate. Each rank backpropagates `summed · 2/labels`, one process
    # `summed · 2/labels / 2` per micro-batch (accelerate divides by grad_accum): the same
    # gradients times a power of two, which float arithmetic scales exactly. DDP then adds the
    # two ranks' gradients and halves; one process adds the two halves. A sum of two floats
    # does not depend on its order, so the optimizer sees identical gradients at every step,
    # and with one thread per process every kernel runs the same code on the same inputs.
    from tests.train_fixtures import assert_tensors_equal

    ref = lora_reference.ranks[0]
    assert_tensors_equal(run.ranks[0].tensors, ref.tensors)
    assert run.ranks[0].grad_norms == ref.grad_norms
    assert run.ranks[0].losses == pytest.approx(ref.losses, rel=LOSS_RTOL)
    assert run.result["final_loss"] == pytest.approx(lora_reference.result["final_loss"],
                                                     rel=LOSS_RTOL)
    assert run.result["tokens"] == lora_reference.result["tokens"]  # the same samples


def test_deepspeed_zero2_lora_equals_one_process(tmp_path, tiny_llava_dir, chart_shards,
                                                 deepspeed_op, lora_reference):
    run = _torchrun(tmp_path, _settings(tiny_llava_dir, chart_shards, tmp_path / "out",
                                        {**LORA, "deepspeed": "zero2"}), nproc=2,
                    deepspeed=True)
    _assert_ranks_agree(run)
    _assert_checkpoint_has_both_ranks(run, deepspeed=True)
    _assert_final_adapter_is(run, run.ranks[1].tensors)

    ref = lora_reference.ranks[0]
    # ZeRO-2 reduces the same gradients exactly as DDP does (halves, then a two-term sum) and
    # steps the same torch AdamW on flat fp32 partitions. The one thing it computes its own
    # way is the gradient norm for clipping (clipping is active at steps 1-2 here): its
    # float32 reduction may differ from torch's in the last ulp (seen: 1e-7 relative at
    # step 4), which changes a clipped step's update by ~1e-7 relative, ~1e-9 absolute at
    # lr 1e-2. Observed: 0.0 (bit-identical). A real fault — a rank's micro-batch lost, the
    # wrong token count, clipping on unsynchronised gradients — moves weights by ~lr = 1e-2.
    assert _max_abs_diff(run.ranks[0].tensors, ref.tensors) <= 1e-6
    assert run.ranks[0].grad_norms == pytest.approx(ref.grad_norms, rel=1e-6)
    assert run.ranks[0].losses == pytest.approx(ref.losses, rel=LOSS_RTOL)
    assert run.result["final_loss"] == pytest.approx(lora_reference.result["final_loss"],
                                                     rel=LOSS_RTOL)


def test_deepspeed_zero3_full_equals_one_process(tmp_path, tiny_llava_dir, chart_shards,
                                                 deepspeed_op, full_reference):
    settings = _settings(tiny_llava_dir, chart_shards, tmp_path / "two" / "out",
                         {**FULL, "deepspeed": "zero3"})
    run = _torchrun(tmp_path / "two", settings, nproc=2, deepspeed=True)
    _assert_ranks_agree(run)
    _assert_checkpoint_has_both_ranks(run, deepspeed=True)
    _assert_final_model_is(run, run.ranks[1].tensors)

    # ZeRO-3 on ONE process with grad_accum=2 is the reference for the distribution itself:
    # same micro-batches, same ZeRO-3 compute path, and the cross-rank gradient reduction is
    # exact for the reason given in the DDP test. Only the float64 gradient norm is summed
    # in another grouping (per rank, then all-reduced): it differs in the last float64 ulp
    # (4.758220403189898 vs ...904), which can at most flip the rounding of a clipped
    # float32 gradient element (ulp ~1e-9 here). Observed: bit-identical weights.
    settings = _settings(tiny_llava_dir, chart_shards, tmp_path / "one" / "out",
                         {**FULL, "deepspeed": "zero3", "grad_accum": 2})
    single = _torchrun(tmp_path / "one", settings, nproc=1, deepspeed=True)
    assert _max_abs_diff(run.ranks[0].tensors, single.ranks[0].tensors) <= 1e-7
    assert run.ranks[0].grad_norms == pytest.approx(single.ranks[0].grad_norms, rel=1e-12)
    assert run.ranks[0].losses == pytest.approx(single.ranks[0].losses, rel=LOSS_RTOL)

    # Against plain (non-DeepSpeed) single-process training ZeRO-3 is close, not identical,
    # even on one process: (1) its step-1 gradients already differ from the plain path's by
    # 1-2 ulp in 21 of the 25 trainable tensors (from layer 1's attention backwards: its
    # gathered-parameter compute path, not the reduction); (2) it clips with a float64
    # gradient norm where torch's clip_grad_norm_ sums in float32 (4.7582204 vs 4.7582121 at
    # step 1, 1.7e-6 relative), so clip coefficients differ by ~1e-6 relative. AdamW turns
    # such differences into per-element update differences far below lr = 1e-3 per step.
    # Observed after 6 steps: 3.2e-6 max abs (2.7e-6 without clipping). The bound, 1e-5, is 1%
    # of one step's largest update; losing a rank's micro-batch or mis-normalising the loss
    # moves weights by ~lr per step.
    ref = full_reference.ranks[0]
    assert _max_abs_diff(run.ranks[0].tensors, ref.tensors) <= 1e-5
    assert run.ranks[0].grad_norms == pytest.approx(ref.grad_norms, rel=1e-5)
    assert run.ranks[0].losses == pytest.approx(ref.losses, rel=LOSS_RTOL)
    assert run.result["final_loss"] == pytest.approx(full_reference.result["final_loss"],
                                                     rel=LOSS_RTOL)


if __name__ == "__main__":  # a rank under torchrun (see the module docstring)
    install_rank_recorder(Path(os.environ[DUMP_ENV]))
    from mmjobs.stages.train import STAGE

    sys.exit(STAGE.cli())
