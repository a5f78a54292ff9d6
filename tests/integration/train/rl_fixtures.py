"""Prompt-only test data for the ppo/grpo tests: canonical prompt records over small chart
images, pretokenized for the tiny LLaVA (`tests.fixtures_models`).

Import the fixtures into a test module::

    from tests.integration.train.rl_fixtures import prompt_shards  # noqa: F401
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart_dataset import commit_dataset, write_chart_dataset
from tests.fixtures_models import tiny_llava_dir  # noqa: F401 - re-exported fixture

PROMPT_MAX_LENGTH = 128


def prompt_records(n: int, *, start: int = 0, text_only_every: int = 0) -> list[dict[str, Any]]:
    """`n` canonical prompt records, each asking about one chart image
    `images/prompt-<i>.png`; `text_only_every=k` makes every k-th prompt image-free."""
    records = []
    for i in range(start, start + n):
        text_only = bool(text_only_every) and i % text_only_every == text_only_every - 1
        records.append({
            "id": f"prompt-{i}", "images": [] if text_only else [f"images/prompt-{i}.png"],
            "prompt": [{"role": "user", "content": ("" if text_only else "<image>\n")
                        + f"Describe the chart. (#{i})"}],
            "meta": {"source": "test"}})
    return records


def build_prompt_shards(root: Path, model_dir: Path, records: list[dict[str, Any]],
                        name: str) -> str:
    """Pretokenize prompt records for `model_dir`; returns the committed shards' URI."""
    from mmjobs.data.pretokenize import PretokenizeJob, pretokenize

    local = write_chart_dataset(root / f"{name}-local", records, kind="prompt")
    dataset = commit_dataset(local, str(root / f"{name}-dataset"))
    out = str(root / f"{name}-shards")
    pretokenize(PretokenizeJob(dataset=dataset, model_dir=str(model_dir), out=out,
                               fingerprint=name, max_length=PROMPT_MAX_LENGTH, shard_size=8))
    return out


@pytest.fixture(scope="session")
def prompt_shards(tmp_path_factory, tiny_llava_dir) -> str:  # noqa: F811
    """8 chart prompts (one image each), one shard."""
    return build_prompt_shards(tmp_path_factory.mktemp("prompt-data"), tiny_llava_dir,
                               prompt_records(8), "prompts8")
