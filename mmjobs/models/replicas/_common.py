"""What every replica builder shares: published files, shrunk sizes, weight files, the record.

Sizes: text models get width 64 / 2 layers / 4 heads, vision towers width 32 / 2 layers /
2 heads. The two widths differ on purpose, so a projector or a converter that swaps vision and
text dimensions fails on a replica as it would on the real model (1024 vs 4096).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

PUBLISHED_ROOT = Path(__file__).parent / "published"
RECORD_NAME = "replica.json"

# Shrunk sizes. Everything not listed here keeps its published value.
TEXT_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4}
VISION_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2}
_LAYER = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<index>\d+)(?P<rest>\..*)$")


def published_dir(folder: str) -> Path:
    """The vendored published files of `folder` (`org--name`)."""
    path = PUBLISHED_ROOT / folder
    if not path.is_dir():
        raise FileNotFoundError(f"no vendored published files for {folder!r} in {PUBLISHED_ROOT}")
    return path


def read_published(folder: str, name: str) -> dict[str, Any]:
    """A vendored JSON file, parsed."""
    return json.loads((published_dir(folder) / name).read_text())


def copy_published(folder: str, out: Path, names: Iterable[str]) -> list[str]:
    """Copy vendored files byte for byte into `out`; returns their names."""
    names = list(names)
    for name in names:
        shutil.copyfile(published_dir(folder) / name, out / name)
    return names


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """JSON the way transformers and the hub files write it (2-space indent, sorted keys, EOL)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def shrink(config: dict[str, Any], sizes: Mapping[str, int]) -> list[str]:
    """Set `sizes` in `config` (in place); returns the keys that changed or were added."""
    changed = [k for k, v in sizes.items() if config.get(k) != v]
    config.update(sizes)
    return changed


def rotary_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The `rotary_emb.inv_freq` buffer transformers 4.31 saved with every Llama layer."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


# --------------------------------------------------------------------------- weight files


def scaled_shard_map(weight_map: Mapping[str, str], names: Iterable[str]) -> Callable[[str], str]:
    """A function giving each replica tensor (of `names`) the shard file of its published twin.

    Tensors outside numbered layers keep their published shard. Replica layer `j` of `n` takes
    the shard of published layer `j * N // n` (N published layers under the same prefix): with
    2 of 32 layers, layers 0 and 16, so the replica's layers spread over the shards as the real
    ones do and every published shard file is used.

    Raises:
        KeyError: (when called) a name the published index does not have.
    """
    published, replica = _layer_counts(weight_map), _layer_counts(names)

    def shard_of(name: str) -> str:
        m = _LAYER.match(name)
        if not m:
            return weight_map[name]
        scaled = int(m["index"]) * published[m["prefix"]] // replica[m["prefix"]]
        return weight_map[f"{m['prefix']}{scaled}{m['rest']}"]

    return shard_of


def _layer_counts(names: Iterable[str]) -> dict[str, int]:
    """{prefix before the layer number: number of layers}."""
    counts: dict[str, int] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            counts[m["prefix"]] = max(counts.get(m["prefix"], 0), int(m["index"]) + 1)
    return counts


def check_names(names: Iterable[str], weight_map: Mapping[str, str], what: str) -> None:
    """Every replica tensor name must be a published one (`ValueError` naming the first few)."""
    unknown = sorted(set(names) - set(weight_map))
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} tensor names are not in the published index "
                         f"(e.g. {unknown[:3]}); the replica's layout drifted from the real one")


def write_weights(tensors: Mapping[str, torch.Tensor], out: Path, shard_of: Callable[[str], str],
                  *, index_name: str | None) -> dict[str, Any] | None:
    """Write `tensors` into the shard files `shard_of(name)` names, plus the index.

    `.safetensors` shards are written with safetensors (metadata `format: pt`, as transformers
    does); `.bin` shards with `torch.save` of a plain dict, the pickle format of the checkpoints
    they stand for. The index has `metadata.total_size` (bytes of tensor data) and a sorted
    `weight_map`, like the hub's. Returns the index (None when `index_name` is None).
    """
    from safetensors.torch import save_file

    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        shards.setdefault(shard_of(name), {})[name] = tensor.detach().contiguous().clone()
    for file, group in sorted(shards.items()):
        if file.endswith(".safetensors"):
            save_file(group, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(group, out / file)
    if index_name is None:
        return None
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: shard_of(name) for name in sorted(tensors)}}
    write_json(out / index_name, index)
    return index


def write_record(out: Path, *, name: str, published: list[str], generated: list[str],
                 shrunk: Mapping[str, list[str]], notes: list[str]) -> None:
    """`replica.json`: which model this stands for, what is published, what was made up here."""
    write_json(out / RECORD_NAME, {
        "replica_of": name,
        "published_files": sorted(published),
        "generated_files": sorted(generated),
        "shrunk_config_keys": {k: sorted(v) for k, v in shrunk.items()},
        "notes": notes,
    })
