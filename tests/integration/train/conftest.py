"""Tiny LLaVA and pretokenized chart shards for the train stage tests (tests/train_fixtures.py)."""

from tests.train_fixtures import (  # noqa: F401
    chart_shards,
    dpo_shards,
    fixed_batch_shards,
    one_thread,
    rm_shards,
    tiny_llava_dir,
)
