"""Training test helpers: tiny pretokenized chart shards, a recording tracking run, configs.

Import the fixtures into a test module or conftest::

    from tests.train_fixtures import chart_shards, fixed_batch_shards, tiny_llava_dir  # noqa

Shards are built once per session with the pretokenize library on the tiny LLaVA from
`tests.fixtures_models` (16 image tokens per 56x56 chart).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.chart_dataset import (
    chart_samples,
    commit_dataset,
    preference_pairs,
    write_chart_dataset,
)
from tests.fixtures_models import tiny_llava_dir  # noqa: F401 - re-exported fixture

SHARD_MAX_LENGTH = 256
# Adapters on the LM's attention, MLP and output head: a random tiny LM only overfits quickly
# when its head can sharpen the near-uniform output distribution.
OVERFIT_LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
                "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]}


def build_shards(root: Path, model_dir: Path, n: int, name: str) -> str:
    """Pretokenize `n` synthetic chart samples for `model_dir`; returns the committed URI."""
    from mmjobs.data.pretokenize import PretokenizeJob, pretokenize

    local = write_chart_dataset(root / f"{name}-local", chart_samples(n))
    dataset = commit_dataset(local, str(root / f"{name}-dataset"))
    out = str(root / f"{name}-shards")
    pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(model_dir), out=out,
                               fingerprint=name, max_length=SHARD_MAX_LENGTH, shard_size=8))
    return out


@pytest.fixture(scope="session")
def chart_shards(tmp_path_factory, tiny_llava_dir) -> str:  # noqa: F811
    """16 chart samples (6 with a second image), 2 shards."""
    return build_shards(tmp_path_factory.mktemp("train-data"), tiny_llava_dir, 16, "charts16")


@pytest.fixture(scope="session")
def fixed_batch_shards(tmp_path_factory, tiny_llava_dir) -> str:  # noqa: F811
    """4 chart samples: with batch size 4 every step sees the same batch."""
    return build_shards(tmp_path_factory.mktemp("train-data"), tiny_llava_dir, 4, "charts4")


def build_preference_shards(root: Path, model_dir: Path, pairs: list[dict[str, Any]],
                            name: str) -> str:
    """Pretokenize canonical preference records for `model_dir`; returns the committed URI."""
    from mmjobs.data.pretokenize import PretokenizeJob, pretokenize

    local = write_chart_dataset(root / f"{name}-local", pairs, kind="preference")
    dataset = commit_dataset(local, str(root / f"{name}-dataset"))
    out = str(root / f"{name}-shards")
    pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(model_dir), out=out,
                               fingerprint=name, max_length=SHARD_MAX_LENGTH, shard_size=8))
    return out


@pytest.fixture(scope="session")
def dpo_shards(tmp_path_factory, tiny_llava_dir) -> str:  # noqa: F811
    """8 chart QA pairs: chosen = the right largest value, rejected = a wrong one."""
    return build_preference_shards(tmp_path_factory.mktemp("pref-data"), tiny_llava_dir,
                                   preference_pairs(8), "dpo8")


@pytest.fixture(scope="session")
def rm_shards(tmp_path_factory, tiny_llava_dir) -> tuple[str, str]:  # noqa: F811
    """(train, held-out eval) shards of a learnable preference: chosen answers end with an
    approving phrase, rejected ones with a disapproving one (32 + 16 pairs; see
    `preference_pairs(style="keyword")`)."""
    root = tmp_path_factory.mktemp("pref-data")
    return (build_preference_shards(root, tiny_llava_dir, preference_pairs(32, style="keyword"),
                                    "rm-train"),
            build_preference_shards(root, tiny_llava_dir,
                                    preference_pairs(16, style="keyword", start=32), "rm-eval"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on 2 shared cores two torch threads thrash (10x slower steps),
    and runs compared bit for bit must use the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingRun:
    """A stand-in for `tracking.RunHandle` that remembers what was logged."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.params: dict[str, Any] = {}
        self.figures: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((int(step or 0), float(value)))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.figures.append(artifact_file)

    def series(self, key: str) -> list[float]:
        return [value for _, value in self.metrics.get(key, [])]

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def train_settings(**overrides: Any) -> dict[str, Any]:
    """A fast LoRA SFT config (as a mapping for `load_config`); keys override. With
    `mode="align"` the adapter settings are left out: align trains the connector alone."""
    base: dict[str, Any] = {
        "mode": "sft", "finetune": "lora", "lr": 1e-2, "max_steps": 12,
        "per_device_batch_size": 4, "grad_accum": 1, "batching": "random",
        "checkpoint_every_steps": 4, "keep_last_checkpoints": 2, "dataloader_workers": 0,
        "warmup_ratio": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
    }
    if overrides.get("mode") == "align":
        del base["finetune"], base["lora"]
    return {**base, **overrides}


def stage_settings(model_dir: Path, data: str, output: str, **train: Any) -> dict[str, Any]:
    """A train stage config mapping (model, data, output, train)."""
    return {"model": {"name_or_path": str(model_dir)}, "data": data, "output": output,
            "train": train_settings(**train)}


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file under `directory`, keyed `file:name`."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(directory).rglob("*.safetensors")):
        rel = path.relative_to(directory).as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names and bit-identical values (torch.equal) for every tensor."""
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------- kill + resume


def launch_train_stage(config: Path, log: Path) -> subprocess.Popen:
    """`mmjobs stage train --config CONFIG` as a subprocess on one thread, output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mmjobs.cli", "stage", "train",
                                 "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def wait_for_first_commit(root: str, proc: subprocess.Popen, log: Path,
                          timeout: float = 240) -> int:
    """The step of the first committed checkpoint under `root` (fails the test if the process
    exits or nothing is committed within `timeout` seconds)."""
    from mmjobs.train import checkpoint as ckpt

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        committed = [i.step for i in ckpt.list_checkpoints(root) if i.committed]
        if committed:
            return committed[-1]
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint:\n"
                        + log.read_text()[-3000:])
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint committed in {timeout:.0f} s")


def kill_then_resume(config: Path, out: str, tmp_path: Path) -> tuple[int, int]:
    """SIGKILL the train stage run by `config` somewhere after its first committed checkpoint,
    check nothing final was committed, run it again to the end; returns (the step of the
    newest checkpoint at the kill, the step the second run resumed from)."""
    import random
    import re
    import signal

    from mmjobs import storage
    from mmjobs.train import checkpoint as ckpt

    log = tmp_path / "killed.log"
    proc = launch_train_stage(config, log)
    root = storage.join(out, ckpt.CHECKPOINTS_DIR)
    wait_for_first_commit(root, proc, log)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in a later step
    if proc.poll() is not None:
        pytest.fail("training finished before it could be killed; make it longer")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not storage.is_committed(storage.join(out, "final"))
    killed_at = ckpt.latest_committed(root).step

    resume_log = tmp_path / "resume.log"
    proc = launch_train_stage(config, resume_log)
    assert proc.wait(timeout=300) == 0, resume_log.read_text()[-3000:]
    resumed = int(re.search(r"resumed from .*step-(\d+) at step", resume_log.read_text())
                  .group(1))
    return killed_at, resumed
