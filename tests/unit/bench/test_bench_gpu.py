"""The GPU benchmark stays runnable: a clean skip without a GPU, and every code path on the CPU
(`--smoke`: the real LLaVA-1.5-7B config with shrunken widths)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.bench.gpu import bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: nothing to skip")
def test_without_a_gpu_the_bench_says_skipped_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "tests.bench.gpu.bench_gpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("bench_gpu: skipped: no CUDA GPU")


@pytest.mark.slow
def test_smoke_run_times_lora_padded_and_packed_and_generation(capsys):
    results = bench_gpu.main(["--smoke", "--only", "lora,generate", "--seq-len", "640"])
    assert [r["case"].split()[0] for r in results] == ["lora", "lora", "generate"]
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in results)
    out = capsys.readouterr().out
    assert "lora sdpa              packed" in out and "generate sdpa" in out
