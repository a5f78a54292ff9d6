"""The pre-tokenized dataset format: Parquet shards under `data/`, their cards beside it.

Layout of `{cache_root}/{fingerprint}/` (see `mmjobs.data.pretokenize` for how it is made)::

    data/shard-00000.parquet ...  rows [i*shard_size, (i+1)*shard_size) of samples.jsonl,
                                  minus rejects; `data/` holds the shards and nothing else
    _shards/shard-00000.json      per-shard marker: stats, rejects, size + sha256 (resume state)
    rejects.jsonl                 {"row", "reason", "source"} per rejected sample, input order
    card.json                     counts, rejects by reason, length histogram, tokens, processor
    README.md                     a Hugging Face dataset card: what the shards hold, and the
                                  `configs` block that points `datasets.load_dataset` at data/
    _MANIFEST.json                written last: the directory is complete

The sidecars sit beside `data/`, not in it, so the folder of shards is a plain Parquet
dataset: `pd.read_parquet(f"{dir}/data")`, `datasets.load_dataset(f"{dir}/data")` (or
`load_dataset(dir)`, through README.md), DuckDB's `read_parquet('{dir}/data/*.parquet')`.

Shard columns (`SHARD_SCHEMA`), one row per sample:

    id                string
    input_ids         list<int32>   [length]; image positions hold the image token id
                                    (placeholder models) or the real VQ token ids (Chameleon)
    labels            list<int32>   [length]; -100 outside assistant turns
    images            list<struct<bytes: binary, path: string>>  original encoded images in
                                    `<image>` order (`path` null): the `datasets` Image feature,
                                    so `load_dataset` yields PIL images; empty for image-token
                                    models (the images are already in input_ids)
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
    images                     list<image>   the prompt's images (both sides use them)
    chosen_images              list<image>   images inside the chosen response (follow `images`
                                             in that side's `<image>` order); usually empty
    rejected_images            list<image>   the same for the rejected response
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

`image` is the sample's image type. Every shard's schema metadata carries the `datasets`
features (key `huggingface`), which is how `datasets` knows the image columns are images.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from mmjobs import layout, storage

CARD_FILE = layout.SHARDS_CARD
REJECTS_FILE = layout.REJECTS_FILE
README_FILE = layout.README_FILE
DATA_DIR = layout.SHARDS_DIR
# v2: shards under data/, images typed as the `datasets` Image feature, README.md.
FORMAT = "mmjobs.pretokenized/v2"
MARKER_DIR = "_shards"
HISTOGRAM_BINS = 16
# The `datasets` Image feature's storage: encoded bytes, and a path (always null here: the
# bytes are the image, a path would point outside the shard).
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
IMAGE_COLUMNS = ("images", "chosen_images", "rejected_images")
HF_METADATA_KEY = b"huggingface"  # where `datasets` keeps its features in a Parquet schema


def _image_field(name: str) -> pa.Field:
    """A column of images. Nullable (though never null): `datasets` takes a column's feature
    from the schema metadata only if the field equals its own, nullable, one."""
    return pa.field(name, pa.list_(IMAGE_TYPE))


_SAMPLE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    _image_field("images"),
    pa.field("num_image_tokens", pa.int32(), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
]


_PREFERENCE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("chosen_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_labels", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_labels", pa.list_(pa.int32()), nullable=False),
    _image_field("images"),
    _image_field("chosen_images"),
    _image_field("rejected_images"),
    pa.field("chosen_num_image_tokens", pa.int32(), nullable=False),
    pa.field("rejected_num_image_tokens", pa.int32(), nullable=False),
    pa.field("chosen_length", pa.int32(), nullable=False),
    pa.field("rejected_length", pa.int32(), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
]


def hf_features(fields: list[pa.Field]) -> dict[str, Any]:
    """The `datasets` features of shard columns (what `datasets` itself writes into a Parquet
    schema's `huggingface` metadata): image lists as `List(Image())`, the rest as `Value`s."""
    def feature(f: pa.Field) -> dict[str, Any]:
        if f.name in IMAGE_COLUMNS:
            return {"feature": {"_type": "Image"}, "_type": "List"}
        if pa.types.is_list(f.type):
            return {"feature": {"dtype": str(f.type.value_type), "_type": "Value"},
                    "_type": "List"}
        return {"dtype": str(f.type), "_type": "Value"}

    return {f.name: feature(f) for f in fields}


def _schema(fields: list[pa.Field]) -> pa.Schema:
    info = {"info": {"features": hf_features(fields)}}
    return pa.schema(fields, metadata={HF_METADATA_KEY: json.dumps(info).encode()})


SHARD_SCHEMA = _schema(_SAMPLE_FIELDS)
PREFERENCE_SHARD_SCHEMA = _schema(_PREFERENCE_FIELDS)
SCHEMAS = {"sample": SHARD_SCHEMA, "preference": PREFERENCE_SHARD_SCHEMA,
           "prompt": SHARD_SCHEMA}


def image_cells(images: list[bytes]) -> list[dict[str, Any]]:
    """A row's encoded images as `images` cells of the Image feature."""
    return [{"bytes": b, "path": None} for b in images]


def shard_name(index: int) -> str:
    """`data/shard-00012.parquet`: the shard's path inside the pre-tokenized directory."""
    return f"{DATA_DIR}/shard-{index:05d}.parquet"


def is_shard_path(rel: str) -> bool:
    """True for a shard's path inside a pre-tokenized directory: `data/shard-*.parquet`, or
    `shard-*.parquet` at the top of a directory written before v2 (still readable)."""
    folder, _, name = rel.rpartition("/")
    return folder in ("", DATA_DIR) and name.startswith("shard-") and name.endswith(".parquet")


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
    storage.read_manifest(uri)  # refuses an incomplete directory
    return json.loads(storage.read_text(storage.join(uri, CARD_FILE)))


def iter_shard_uris(uri: str | os.PathLike) -> Iterator[str]:
    """URIs of the shards of a committed pre-tokenized directory, in order."""
    for entry in sorted(storage.read_manifest(uri).files, key=lambda f: f.path):
        if is_shard_path(entry.path):
            yield storage.join(uri, entry.path)


def dataset_readme(card: dict[str, Any]) -> str:
    """README.md of a pre-tokenized directory: a Hugging Face dataset card whose `configs`
    header points `datasets.load_dataset(dir)` at `data/` (without it, `datasets` would pick
    files by their most common extension and read the JSON sidecars), then what the shards
    hold and how to read them."""
    counts, tokens = card["counts"], card["tokens"]
    columns = "\n".join(f"| `{name}` | `{kind}` |" for name, kind in card["columns"].items())
    reasons = ", ".join(f"{k} {v}" for k, v in card["rejected_by_reason"].items()) or "none"
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_DIR}/*.parquet
tags:
- mmjobs
- pretokenized
---
# Pre-tokenized {card["kind"]} shards

Made by `mmjobs pretokenize` from `{card["dataset"]}` with the processor of
`{card.get("model", "?")}` (max_length {card["max_length"]}; fingerprint `{card["fingerprint"]}`).

- rows: {counts["input"]} in, {counts["written"]} written, {counts["rejected"]} rejected \
({reasons}; `{REJECTS_FILE}` lists them)
- tokens: {tokens["total"]} ({tokens["label"]} labelled, {tokens["image"]} image), mean length \
{tokens["mean_length"]}
- images: {card["images"]}; shards: {len(card["shards"])}; format `{card["format"]}`

`{DATA_DIR}/` holds the Parquet shards and nothing else; `{CARD_FILE}` (counts, length
histogram, processor) and `{REJECTS_FILE}` sit beside it.

| column | type |
|---|---|
{columns}

Image columns use the `datasets` Image feature (`{{bytes, path}}`), so `datasets` decodes
them to PIL images. `labels` are -100 where no loss is taken.

```python
import pandas as pd
frame = pd.read_parquet("{DATA_DIR}")                  # from this folder

import datasets
rows = datasets.load_dataset(".", split="train")  # or load_dataset("{DATA_DIR}")

import duckdb
duckdb.sql("SELECT id, length FROM '{DATA_DIR}/*.parquet'")
```
"""


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
