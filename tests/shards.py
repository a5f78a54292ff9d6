"""Reading pre-tokenized shards in tests as users read them: the `data/` folder, whole."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mmjobs.data import pretokenized as fmt


def read_shards(out: str | os.PathLike) -> pd.DataFrame:
    """All rows of a local pre-tokenized directory, in shard order (`pd.read_parquet` of its
    `data/` folder), with image columns as lists of encoded bytes (the cells are the
    `datasets` Image feature's `{bytes, path}`)."""
    frame = pd.read_parquet(Path(out) / fmt.DATA_DIR)
    for column in fmt.IMAGE_COLUMNS:
        if column in frame:
            frame[column] = [[cell["bytes"] for cell in cells] for cells in frame[column]]
    return frame


def shard_files(out: str | os.PathLike) -> list[Path]:
    """The shard files of a local pre-tokenized directory, in order."""
    return sorted((Path(out) / fmt.DATA_DIR).glob("shard-*.parquet"))
