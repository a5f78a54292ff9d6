"""LaVIN inference: a LaVIN base directory + the MMA adapter tensors a training run exported,
generating as LaVIN's `eval.py` / `LaVIN_Generator` does.

    loaded = load_lavin(model_dir, adapter_dir)            # base + adapters, eval mode
    answers = lavin_generator(loaded).generate([PromptInput(prompt, [image])])

- **Loading.** `model_dir` is a LaVIN directory (`build_lavin`): the base weights and the
  adapters as initialised. `adapter_dir` holds what `train.finetune: mma` writes
  (`save_adapters`: every parameter named *adapter*, ~3.8M for 7B); they replace the initial
  adapters, as LaVIN's eval loads `checkpoint-19.pth` over the base with `strict=False`. A
  directory or adapter that does not fit is refused with the file named (`load_adapters`).
- **Prompts.** The `lavin` conversation format: `BOS "Image: " <6 visual tokens> prompt` (or
  `"Image: N/A"` without an image), the ids `LaVIN_Generator` builds
  (`mmjobs.data.conversation.lavin`). The modality token is the model's.
- **Decoding.** Greedy by default (LaVIN's ScienceQA eval samples with temperature 0.1 and
  top_p 0.75; pass `do_sample=True` for that), at most 64 new tokens (`max_gen_len=64`),
  stopping at EOS, the KV cache reused (the routers keep the prompt's weights while decoding,
  as LaVIN computes them once at `start_pos` 0). Batches are left-padded; positions follow the
  attention mask, so a padded row generates what it would alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmjobs.eval.generate import Generator
from mmjobs.image_backend import processor_kwargs
from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel
from mmjobs.models.convert.checkpoints import ConversionError
from mmjobs.models.lavin import is_lavin_dir, register
from mmjobs.models.lavin.compose import is_lavin_adapter, load_adapters

log = get_logger(__name__)

MAX_NEW_TOKENS = 64  # LaVIN eval.py: max_gen_len=64 for ScienceQA
SAMPLING = {"temperature": 0.1, "top_p": 0.75}  # LaVIN eval.py's defaults, when sampling


def load_lavin(model_dir: str | Path, adapter_dir: str | Path | None = None, *,
               dtype: str = "float32", device: str | torch.device | None = None) -> LoadedModel:
    """A LaVIN for generation: the base directory, with trained adapters when given.

    Args:
        model_dir: a local LaVIN directory (`mmjobs.models.lavin.compose.build_lavin`).
        adapter_dir: a local directory `save_adapters` wrote (a training run's `adapter/`).
        dtype: the base weights' dtype (`float32`, `bfloat16`, `float16`); LaVIN runs its
            adapters in float32 and the rest in fp16 on GPUs.
        device: default CUDA when available, else CPU.

    Returns:
        A `LoadedModel` (kind `lavin`, eval mode); `info` records the adapter and the
        `lavin` conversation format, which `Generator` picks up.

    Raises:
        ConversionError: not a LaVIN directory, not a LaVIN adapter directory, or adapters
            that do not fit this base.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = Path(model_dir)
    if not is_lavin_dir(model_dir):
        raise ConversionError(f"{model_dir}: config.json is not a LaVIN config (model_type "
                              "'lavin'); build the model with the convert stage (kind: lavin, "
                              "mmjobs.models.lavin.compose.build_lavin)")
    if adapter_dir is not None and not is_lavin_adapter(adapter_dir):
        raise ConversionError(f"{adapter_dir}: no LaVIN adapter_config.json; give the adapter "
                              "directory a train.finetune: mma run wrote (its adapter/)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
    register()
    target = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    # local_files_only: inference never reaches a model hub, even by accident.
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True,
                                              **processor_kwargs())
    tensors = load_adapters(model, adapter_dir) if adapter_dir is not None else 0
    model.to(target).eval()
    info: dict[str, Any] = {
        "source": str(model_dir), "model_type": "lavin", "dtype": dtype,
        "conversation_format": "lavin", "adapter": str(adapter_dir) if adapter_dir else None,
        "adapter_tensors": tensors, "adapter_merged": False,
        "num_parameters": sum(p.numel() for p in model.parameters())}
    log.info("loaded LaVIN %s%s on %s", model_dir,
             f" with {tensors} adapter tensors from {adapter_dir}" if adapter_dir else "", target)
    return LoadedModel(model=model, processor=processor, model_dir=model_dir, kind="lavin",
                       info=info)


def lavin_generator(loaded: LoadedModel, *, batch_size: int = 16,
                    max_new_tokens: int = MAX_NEW_TOKENS, do_sample: bool = False,
                    seed: int = 0, **sampling: float) -> Generator:
    """A `Generator` that prompts and decodes as LaVIN's eval does (see the module docstring).

    `sampling` overrides `SAMPLING` (temperature, top_p) when `do_sample` is set.
    """
    settings = {**SAMPLING, **sampling} if do_sample else {}
    return Generator(loaded, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     do_sample=do_sample, seed=seed, conversation_format="lavin", **settings)
