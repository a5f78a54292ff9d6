"""The pre-tokenized dataset format: Parquet shards + `card.json` in a committed directory.

Layout of `{cache_root}/{fingerprint}/` (see `mmjobs.data.pretokenize` for how it is made)::

    shard-00000.parquet ...   rows [i*shard_size, (i+1)*shard_size) of samples.jsonl, minus rejects
    _shards/shard-00000.json  per-shard marker: stats, rejects, size + sha256 (resume state)
    rejects.jsonl             {"row", "reason", "source"} per rejected sample, in input order
    card.json                 counts, rejects by reason, length histogram, tokens, processor
    _MANIFEST.json            written last: the directory is complete

Shard columns (`SHARD_SCHEMA`), one row per sample:

    id                string
    input_ids         list<int32>   [length]; image positions hold the image token id
                                    (placeholder models) or the real VQ token ids (Chameleon)
    labels            list<int32>   [length]; -100 outside assistant turns
    images            list<binary>  original encoded image bytes in `<image>` order; empty for
                                    image-token models (the images are already in input_ids)
    num_image_tokens  int32         image positions in input_ids
    length            int32         len(input_ids)

Preference shards (`PREFERENCE_SHARD_SCHEMA`; card `kind: preference`), one row per pair, for
DPO and reward models. Each side is the prompt followed by one response, labelled on the
response only; both sides start with the same prompt tokens:

    id                         string
    chosen_input_ids           list<int32>   [chosen_length]  prompt + chosen response
    chosen_labels              list<int32>   [chosen_length]  -100 outside the response
    rejected_input_ids         list<int32>   [rejected_length]
    rejected_labels            list<int32>   [rejected_length]
    images                     list<binary>  the prompt's images (both sides use them)
    chosen_images              list<binary>  images inside the chosen response (follow `images`
                                             in that side's `<image>` order); usually empty
    rejected_images            list<binary>  the same for the rejected response
    chosen_num_image_tokens    int32
    rejected_num_image_tokens  int32
    chosen_length              int32         len(chosen_input_ids)
    rejected_length            int32         len(rejected_input_ids)
    length                     int32         max(chosen_length, rejected_length): the width of
                                             the padded pair, what samplers group and bound

Prompt shards (card `kind: prompt`, from a prompt-only dataset) have the sample columns, one
row per prompt for PPO/GRPO rollouts: `input_ids` is the prompt rendered by the chat template
with the generation prompt (the assistant header) at its end, `labels` are all -100 (nothing
is learned from a prompt), `images` the prompt's images.

Readable by pandas (`pd.read_parquet`), pyarrow, `datasets` and DuckDB.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from mmjobs import layout, storage

CARD_FILE = layout.SHARDS_CARD
REJECTS_FILE = layout.REJECTS_FILE
FORMAT = "mmjobs.pretokenized/v1"
MARKER_DIR = "_shards"
HISTOGRAM_BINS = 16

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    pa.field("images", pa.list_(pa.binary()), nullable=False),
    pa.field("num_image_tokens", pa.int32(), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
])


PREFERENCE_SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("chosen_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_labels", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_labels", pa.list_(pa.int32()), nullable=False),
    pa.field("images", pa.list_(pa.binary()), nullable=False),
    pa.field("chosen_images", pa.list_(pa.binary()), nullable=False),
    pa.field("rejected_images", pa.list_(pa.binary()), nullable=False),
    pa.field("chosen_num_image_tokens", pa.int32(), nullable=False),
    pa.field("rejected_num_image_tokens", pa.int32(), nullable=False),
    pa.field("chosen_length", pa.int32(), nullable=False),
    pa.field("rejected_length", pa.int32(), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
])
SCHEMAS = {"sample": SHARD_SCHEMA, "preference": PREFERENCE_SHARD_SCHEMA,
           "prompt": SHARD_SCHEMA}


def shard_name(index: int) -> str:
    """`shard-00012.parquet`."""
    return f"shard-{index:05d}.parquet"


def marker_name(index: int) -> str:
    """`_shards/shard-00012.json`: present only once shard `index` is completely written."""
    return f"{MARKER_DIR}/shard-{index:05d}.json"


def histogram_edges(max_length: int, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Fixed bin edges over [0, max_length], so per-shard histograms add up."""
    return sorted({round(i * max_length / bins) for i in range(bins + 1)})


def histogram_counts(lengths: list[int], edges: list[int]) -> list[int]:
    """Counts per bin `[edges[i], edges[i+1])`, the last bin closed (lengths <= max_length)."""
    counts = [0] * (len(edges) - 1)
    for n in lengths:
        counts[min(max(bisect.bisect_right(edges, n) - 1, 0), len(counts) - 1)] += 1
    return counts


def schema_description(kind: str = "sample") -> dict[str, str]:
    """Column name -> Arrow type of the shards of `kind` (sample, preference, prompt), for the
    card."""
    return {f.name: str(f.type) for f in SCHEMAS[kind]}


def read_card(uri: str | os.PathLike) -> dict[str, Any]:
    """The card of a committed pre-tokenized directory."""
    import json

    storage.read_manifest(uri)  # refuses an incomplete directory
    return json.loads(storage.read_text(storage.join(uri, CARD_FILE)))


def iter_shard_uris(uri: str | os.PathLike) -> Iterator[str]:
    """URIs of the shards of a committed pre-tokenized directory, in order."""
    for entry in sorted(storage.read_manifest(uri).files, key=lambda f: f.path):
        if entry.path.startswith("shard-") and entry.path.endswith(".parquet"):
            yield storage.join(uri, entry.path)


def length_histogram_figure(card: dict[str, Any]):
    """A matplotlib bar chart of the card's length histogram (for MLflow)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    hist = card["length_histogram"]
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in itertools.pairwise(edges)],
           align="edge", edgecolor="black")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"length (max_length {card['max_length']}, {card['counts']['written']} samples)")
    fig.tight_layout()
    return fig
