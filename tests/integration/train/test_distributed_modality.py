"""ZeRO-3 on data that mixes text-only and image samples (2 CPU ranks, torchrun, gloo).

Under ZeRO-3 a rank whose micro-batch has no image skips the vision tower and with it the
all-gathers of the tower's parameter shards, so its collectives pair up with the wrong ones on
a rank that has images. With `train.group_by_modality` unset (on under ZeRO-3) every micro-step
is all-image or all-text across ranks and training runs to the end; with it off the first mixed
micro-step desynchronises the ranks. On NCCL that is a hang; gloo usually notices the payload
sizes differ and aborts at once, and where it cannot, the process-group timeout
(`MMJOBS_DIST_TIMEOUT_S`, 60 s here) turns the hang into an error. A wall clock outside both
(`WALL_S`) only guards the suite against something neither catches.

Each rank runs this module as its entrypoint: the `__main__` block makes the trainer write every
micro-batch it draws (ids, images) to `rank-R.jsonl` before the forward pass, then runs the
real stage CLI. That is how the test sees what each rank trained on at each micro-step, and
where the ungrouped run stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.train.test_distributed import deepspeed_op  # noqa: F401 - fixture

# deepspeed_op: DeepSpeed's CPU op built once, outside the runs' wall clock.
pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.usefixtures("deepspeed_op")]

REPO = Path(__file__).resolve().parents[3]
RECORD_ENV = "MMJOBS_TEST_MICRO_BATCHES"
STALL_ENV = "MMJOBS_TEST_STALL_ONE_RANK"
WALL_S = 240
DIST_TIMEOUT_S = 60
# 5 image + 7 text-only samples, 2 per rank on 2 ranks. Grouped: 2 image micro-steps (the
# 1-sample tail merged with the unit before it) and 2 text ones (the 3-sample tail spread over
# both ranks) per epoch; 5 steps cross into epoch 1. Ungrouped (seed 42): the first micro-step
# already gives rank 0 images and rank 1 none.
N_IMAGE, N_TEXT, STEPS = 5, 7, 5
TRAIN = {"mode": "sft", "finetune": "full", "lr": 1e-3, "max_steps": STEPS,
         "per_device_batch_size": 2, "grad_accum": 1, "batching": "random",
         "deepspeed": "zero3", "checkpoint_every_steps": 0, "warmup_ratio": 0.0,
         "dataloader_workers": 0}
# What a desynchronised collective looks like: gloo's size check, or the timeout.
DESYNC = ("collective mismatch", "doesn't match expected size", "Timed out", "timed out",
          "Timeout")


# --------------------------------------------------------------------------- rank side


def install_micro_batch_recorder(directory: Path) -> None:
    """Make every rank append `{"ids", "images"}` of each micro-batch it draws to
    `directory/rank-R.jsonl`, flushed before the batch is used (a crashed run keeps them)."""
    from mmjobs.train import trainer

    next_batch = trainer.TrainRecipe._next_batch

    def recording_next_batch(self: Any) -> dict[str, Any]:
        batch = next_batch(self)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"rank-{self.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps({"ids": list(batch["ids"]),
                                "images": int(batch["num_images"].sum())}) + "\n")
        return batch

    trainer.TrainRecipe._next_batch = recording_next_batch


def stall_one_rank() -> int:
    """Join the job as the train stage does (`build_accelerator`, ZeRO-3), then let rank 1
    enter an all-reduce that rank 0 never joins; print how long rank 1 waited for its error."""
    import time

    import torch
    import torch.distributed as dist

    from mmjobs.train.distributed import build_accelerator

    acc = build_accelerator(mixed_precision="no", grad_accum=1, deepspeed="zero3",
                            micro_batch_size=1, max_grad_norm=1.0, hidden_size=64)
    start = time.monotonic()
    if acc.process_index == 0:
        time.sleep(WALL_S)  # the peer that never comes
        return 0
    try:
        dist.all_reduce(torch.ones(3))
    except RuntimeError as e:
        print(f"rank 1 failed after {time.monotonic() - start:.1f} s: {e}", flush=True)
        os._exit(3)  # at once: the process group's teardown would wait for rank 0
    return 0


# --------------------------------------------------------------------------- test side


def text_only_samples(n: int) -> list[dict[str, Any]]:
    """`n` canonical conversations without images (ShareGPT-like rows of a mix665k)."""
    return [{"id": f"text-{i}", "images": [], "meta": {"source": "test"}, "conversations": [
        {"role": "user", "content": f"Add {i} and {i + 3}."},
        {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}]}
        for i in range(n)]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, tiny_llava_dir) -> str:
    from mmjobs.data.pretokenize import PretokenizeJob, pretokenize
    from tests.chart_dataset import chart_samples, commit_dataset, write_chart_dataset

    root = tmp_path_factory.mktemp("mixed-data")
    local = write_chart_dataset(root / "local",
                                chart_samples(N_IMAGE) + text_only_samples(N_TEXT))
    dataset = commit_dataset(local, str(root / "dataset"))
    out = str(root / "shards")
    pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(tiny_llava_dir), out=out,
                               fingerprint="mixed", max_length=256, shard_size=8))
    return out


def torchrun(args: list[str], env: dict[str, str], timeout_s: int) -> tuple[int | None, str]:
    """Run this module on 2 ranks under torchrun; (exit code or None if `timeout_s` ran out,
    stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.integration.train.test_distributed_modality", *args]
    # Own process group: on a timeout the ranks go too, not just torchrun.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]


def launch(tmp: Path, model_dir: Path, data: str, train: dict[str, Any]
           ) -> tuple[int | None, str, list[list[dict[str, Any]]]]:
    """torchrun the train stage on 2 ranks under `WALL_S`.

    Returns:
        (exit code, or None if the wall clock ran out; stdout + stderr; each rank's
        micro-batch records in order).
    """
    import yaml

    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)}, "data": data,
                                      "output": str(tmp / "out"), "train": train}))
    code, output = torchrun(["--config", str(config)],
                            {"MMJOBS_DIST_TIMEOUT_S": str(DIST_TIMEOUT_S),
                             RECORD_ENV: str(tmp / "ranks")}, WALL_S)
    records = []
    for rank in (0, 1):
        path = tmp / "ranks" / f"rank-{rank}.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        records.append([json.loads(line) for line in lines])
    return code, output, records


def modalities(records: list[list[dict[str, Any]]]) -> list[tuple[bool, ...]]:
    """Per micro-step, each rank's "has images" (steps both ranks reached)."""
    return [tuple(r["images"] > 0 for r in step) for step in zip(*records, strict=False)]


def test_zero3_on_mixed_data_runs_with_modality_grouping(tmp_path, tiny_llava_dir,
                                                         mixed_shards):
    code, output, records = launch(tmp_path, tiny_llava_dir, mixed_shards, TRAIN)
    assert code == 0, output[-6000:]
    result = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == STEPS
    assert "batches grouped by modality" in output  # the default turned it on

    assert [len(r) for r in records] == [STEPS, STEPS]
    steps = modalities(records)
    assert all(len(set(step)) == 1 for step in steps), steps
    assert {step[0] for step in steps} == {True, False}, "both modalities must have trained"
    # Epoch 0 is 4 micro-steps: every sample exactly once, over both ranks.
    epoch0 = [i for rank in records for r in rank[:4] for i in r["ids"]]
    assert sorted(epoch0) == sorted([f"chart-{i}" for i in range(N_IMAGE)]
                                    + [f"text-{i}" for i in range(N_TEXT)])


def test_zero3_on_mixed_data_desynchronises_without_grouping(tmp_path, tiny_llava_dir,
                                                             mixed_shards):
    code, output, records = launch(tmp_path, tiny_llava_dir, mixed_shards,
                                   {**TRAIN, "group_by_modality": False})
    assert "group_by_modality is off" in output  # the warning said what would happen
    steps = modalities(records)
    mixed = [k for k, step in enumerate(steps) if len(set(step)) > 1]
    assert mixed, f"this seed gave no mixed micro-step, so nothing was tested: {steps}"
    assert code != 0, "training on mixed micro-steps under ZeRO-3 finished: " + output[-3000:]
    assert code is None or any(sign in output for sign in DESYNC), output[-6000:]
    # Nobody got past the first mixed micro-step.
    assert max(len(r) for r in records) == mixed[0] + 1, steps
    assert not any(line.startswith("{") for line in output.splitlines())


def test_the_process_group_timeout_turns_a_stalled_collective_into_an_error():
    code, output = torchrun([], {STALL_ENV: "1", "MMJOBS_DIST_TIMEOUT_S": "5"}, WALL_S)
    assert code not in (0, None), output[-3000:]
    waited = [line for line in output.splitlines() if line.startswith("rank 1 failed after")]
    assert waited and "Timed out" in waited[0], output[-3000:]
    # 5 s configured; the default (30 min with gloo) would have hit WALL_S first.
    assert 4.5 <= float(waited[0].split()[4]) < 60, waited[0]


if __name__ == "__main__":  # a rank under torchrun (see the module docstring)
    if os.environ.get(STALL_ENV):
        sys.exit(stall_one_rank())
    install_micro_batch_recorder(Path(os.environ[RECORD_ENV]))
    from mmjobs.stages.train import STAGE

    sys.exit(STAGE.cli())
