"""The prompts an inference run answers, from a canonical dataset or a benchmark.

`iter_items` yields `PromptItem`s in source order: a committed canonical dataset's `sample`
records (the conversation up to the last assistant turn is the prompt, that turn's content the
gold answer) or `prompt` records as they are (`dataset_items`), or a benchmark's items
(`mmjobs.eval.benchmarks.load_benchmark`); with the `split` filter, a `prompt_suffix` on the
last user turn (e.g. a program-of-thought instruction) and a `limit`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmjobs import storage


class PromptSource(Protocol):
    """Where prompts come from (the infer stage's config has these fields)."""

    dataset: str | None
    split: str | None
    benchmark: str | None
    benchmark_root: str | None
    benchmark_options: dict[str, Any]
    limit: int | None
    prompt_suffix: str


@dataclass
class PromptItem:
    """One prompt to answer: `prompt` is a user text or turns; `images` are URIs."""

    id: str
    prompt: str | list[dict[str, str]]
    images: list[str]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn (the `prompt` column of the predictions)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def iter_items(cfg: PromptSource) -> Iterator[PromptItem]:
    """The prompts to answer, in source order (split filter, suffix and limit applied)."""
    if cfg.dataset is not None:
        items = dataset_items(cfg.dataset, split=cfg.split)
    else:
        from mmjobs.eval.benchmarks import load_benchmark

        root = cfg.benchmark_root or ""
        items = (PromptItem(b.id, b.prompt, list(b.images), dict(b.fields))
                 for b in load_benchmark(cfg.benchmark or "", root, **cfg.benchmark_options))
    for n, item in enumerate(items):
        if cfg.limit is not None and n >= cfg.limit:
            return
        if cfg.prompt_suffix:
            item.prompt = _with_suffix(item.prompt, cfg.prompt_suffix)
        yield item


def dataset_items(dataset: str, *, split: str | None = None) -> Iterator[PromptItem]:
    """Prompts from a committed canonical dataset of `sample` or `prompt` records.

    A sample's prompt is its conversation up to the last assistant turn, whose content is the
    gold answer: `gt`, and `answers` unless `meta.answers` gives the accepted answers. Every
    `meta` field is copied into the row (split, question_type, ...).

    Raises:
        storage.IncompleteDirectoryError: `dataset` is not committed.
        ValueError: a preference dataset, or a record without a user turn to answer.
    """
    from mmjobs.data.pretokenize import resolve_image_root
    from mmjobs.data.records import CARD_FILE, IMAGE_TOKEN, SAMPLES_FILE, iter_records

    storage.read_manifest(dataset)  # an uncommitted dataset is never an input
    card = json.loads(storage.read_text(storage.join(dataset, CARD_FILE)))
    kind = card.get("kind", "sample")
    if kind not in ("sample", "prompt"):
        raise ValueError(f"{dataset}: a {kind} dataset; infer answers sample or prompt datasets")
    image_root = resolve_image_root(dataset, card)
    for record in iter_records(storage.join(dataset, SAMPLES_FILE), kind):
        if split is not None and record.meta.get("split") != split:
            continue
        turns = [t.model_dump() for t in (record.conversations if kind == "sample"
                                          else record.prompt)]
        gold = None
        assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        if kind == "sample" and assistant:
            gold = turns[assistant[-1]]["content"]
            turns = turns[:assistant[-1]]
        if not turns or turns[-1]["role"] != "user":
            raise ValueError(f"{dataset}: record {record.id}: no user turn to answer before "
                             "the last assistant turn")
        used = sum(t["content"].count(IMAGE_TOKEN) for t in turns)  # not the answer's images
        fields = dict(record.meta)
        if gold is not None:
            fields = {"answers": record.meta.get("answers") or [gold], "gt": gold, **fields}
        yield PromptItem(record.id, turns, [storage.join(image_root, p)
                                            for p in record.images[:used]], fields)


def _with_suffix(prompt: str | list[dict[str, str]], suffix: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        return prompt + suffix
    last = {**prompt[-1], "content": prompt[-1]["content"] + suffix}
    return [*prompt[:-1], last]
