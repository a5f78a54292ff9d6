"""Read checkpoint tensors safely, and write them as sharded safetensors.

Pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are read with
`torch.load(weights_only=True, mmap=True)`: PyTorch's restricted unpickler, which builds only
tensors and plain containers and refuses any other global (a class, `os.system`, a
`__reduce__` payload). A file it refuses is reported with the reason and never loaded another
way. `mmap` keeps a 10 GB shard on disk instead of in memory (old non-zip pickles cannot be
mapped; they are read without it, still restricted). Safetensors files are read as they are.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmjobs.logs import get_logger

log = get_logger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
_WRAPPERS = ("state_dict", "model", "module")  # training checkpoints nest the weights


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file or key and what to do."""


class UnsafeCheckpointError(ConversionError):
    """A pickle needs code (not just tensors) to load, so it is refused."""


def layout_mismatch(expected: Mapping[str, tuple[int, ...]],
                    tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `tensors` from loading into a model whose state dict has the names and
    shapes `expected` (a few examples of missing, unexpected and wrongly shaped tensors), or
    None when they fit exactly."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors)
                   if tuple(tensors[k].shape) != expected[k])
    details = [f"missing {missing[:4]}" if missing else "",
               f"unexpected {extra[:4]}" if extra else "",
               "shape " + ", ".join(f"{k} {tuple(tensors[k].shape)} != {expected[k]}"
                                    for k in wrong[:3]) if wrong else ""]
    return "; ".join(d for d in details if d) or None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file, by name (a flat `{name: tensor}` dict).

    Raises:
        UnsafeCheckpointError: the pickle needs code to load.
        ConversionError: not a checkpoint, or not a mapping of names to tensors.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = _restricted_load(path)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                      lines[0] if lines else type(e).__name__)
        what = ("loading it would run code, not just build tensors" if "GLOBAL" in detail else
                "torch.load(weights_only=True) cannot read it as a plain tensor pickle (it is "
                "corrupt, or written in a form that may need code)")
        raise UnsafeCheckpointError(
            f"{path}: refused: {what} ({detail}). mmjobs reads pickled checkpoints only with "
            "torch.load(weights_only=True); re-save the weights as safetensors where you trust "
            "the file, or get a safetensors copy from its publisher") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    return _flat_tensors(obj, path)


def _restricted_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # A pre-zipfile (legacy) pickle cannot be memory-mapped; same restricted unpickler.
        return torch.load(path, map_location="cpu", weights_only=True)


def _flat_tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a mapping of tensor "
                              "names to tensors")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)]
        if len(nested) == 1:
            log.info("%s: reading the tensors under its %r entry", path, nested[0])
            return _flat_tensors(obj[nested[0]], path)
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise ConversionError(f"{path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a "
                              "tensor; expected a flat {name: tensor} state dict")
    return {str(k): v for k, v in obj.items()}


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model directory, from its index when it has one.

    Looks for (in order) `model.safetensors.index.json`, `pytorch_model.bin.index.json`,
    `model.safetensors`, `pytorch_model.bin`, then a single other pickle (`*.pth`, e.g. Meta's
    `consolidated.00.pth`). Index entries must be plain file names inside `model_dir`.

    Raises:
        ConversionError: no weights, several candidates, or a bad index.
    """
    root = Path(model_dir)
    for name in _INDEXES:
        if (root / name).is_file():
            return _indexed_files(root / name)
    for name in _SINGLE:
        if (root / name).is_file():
            return [root / name]
    pickles = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return pickles
    if not pickles:
        raise ConversionError(f"{root}: no weights found (no *.safetensors, *.bin, *.pt, *.pth)")
    raise ConversionError(f"{root}: several weight files ({', '.join(p.name for p in pickles)}) "
                          "and no index saying which belong together; keep one, or add the "
                          "index the publisher ships")


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index}: not a weight index (needs a weight_map of tensor "
                              f"name -> file name): {e}") from e
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in {"", ".", ".."}:
            raise ConversionError(f"{index}: file {name!r} is not a plain file name in this "
                                  "folder; refusing to read outside it")
        if not (index.parent / name).is_file():
            raise ConversionError(f"{index}: lists {name}, which is missing (incomplete "
                                  "download?)")
    return [index.parent / name for name in names]


def load_checkpoint_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (see `checkpoint_files`), checked against its index.

    Raises:
        ConversionError / UnsafeCheckpointError: see `load_tensors`, `checkpoint_files`; also a
            tensor in two shards, or index and shards that disagree.
    """
    files = checkpoint_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in load_tensors(path).items():
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name!r} is also in another shard")
            tensors[name] = tensor
    index = next((Path(model_dir) / n for n in _INDEXES if (Path(model_dir) / n).is_file()), None)
    if index is not None:
        listed = set(json.loads(index.read_text())["weight_map"])
        missing, extra = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
        if missing or extra:
            raise ConversionError(f"{index}: the shards do not match the index (missing "
                                  f"{missing[:3]}, not listed {extra[:3]})")
    return tensors


def save_sharded(tensors: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                 max_shard_size: int | str = "5GB") -> list[str]:
    """Write `tensors` as safetensors: `model.safetensors`, or shards
    `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` when they exceed
    `max_shard_size` (transformers' names and index format). Returns the files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(dict(tensors), max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file(_unshared({n: tensors[n] for n in names}), str(out / file),
                  metadata={"format": "pt"})
    written = sorted(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written


def _unshared(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that are views or share storage (safetensors refuses those)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in group.items():
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.numel() * tensor.element_size() == storage.nbytes()
        if not whole or storage.data_ptr() in seen:
            tensor = tensor.contiguous().clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out
