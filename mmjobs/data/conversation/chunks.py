"""LLaVA's way of tokenizing a prompt with images (`tokenizer_image_token`), for transformers.

haotian-liu/LLaVA splits the prompt at each `<image>`, tokenizes every piece on its own (each
with BOS, dropped again from all pieces but the first) and puts the sentinel id -200 between
them. Tokenized on its own, a piece starts with SentencePiece's word-start `▁`, so the text
after an image gets one token that tokenizing the whole prompt at once does not give
(`<image>\\nWhat` -> `-200 ▁ <0x0A> What` instead of `<image> <0x0A> What`). transformers'
LLaVA needs a real token per image feature instead of the sentinel, so here each image becomes
the ids the processor expands it to (576 `<image>` ids for LLaVA-1.5 at 336 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize_image_chunks(tokenizer: Any, text: str, image_token: str,
                          expansions: Sequence[Sequence[int]]
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` tokenized piece by piece between image markers, and their offsets.

    Args:
        tokenizer: a fast tokenizer (character offsets are needed).
        text: the rendered conversation, `image_token` where each image goes.
        image_token: the marker string.
        expansions: per image, in order, the ids it becomes.

    Returns:
        `(ids, offsets)`: offsets are `(start, end)` character ranges in `text`; an image's
        ids all get the marker's range, BOS the empty range at 0.

    Raises:
        ValueError: the number of markers differs from `len(expansions)`.
    """
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(expansions):
        raise ValueError(f"{len(pieces) - 1} {image_token} markers but {len(expansions)} "
                         "image expansions")
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for k, piece in enumerate(pieces):
        if k:
            ids += list(expansions[k - 1])
            offsets += [(pos, pos + len(image_token))] * len(expansions[k - 1])
            pos += len(image_token)
        enc = tokenizer(piece, add_special_tokens=True, return_offsets_mapping=True)
        piece_ids, piece_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if k and bos is not None and piece_ids[:1] == [bos]:
            piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
        ids += [int(t) for t in piece_ids]
        offsets += [(pos + int(s), pos + int(e)) for s, e in piece_offsets]
        pos += len(piece)
    return ids, offsets


def image_expansions(processor: Any, images: Sequence[Any], image_token: str,
                     **kwargs: Any) -> tuple[list[list[int]], dict[str, Any]]:
    """What the processor turns each image into: its ids, and the image tensors it makes.

    Each image goes through the processor alone, as the text `image_token`, so its expansion
    (e.g. 576 image-token ids, or begin + codes + end for Chameleon) is known per image.

    Returns:
        `(expansions, image_inputs)`: `image_inputs` maps each image tensor the processor
        returned (`pixel_values`, ...) to the images' tensors concatenated along dim 0.
    """
    import torch

    expansions: list[list[int]] = []
    tensors: dict[str, list[Any]] = {}
    for image in images:
        out = processor(text=[image_token], images=[image], add_special_tokens=False,
                        return_tensors="pt", **kwargs)
        expansions.append([int(t) for t in out["input_ids"][0]])
        for key, value in out.items():
            if key not in ("input_ids", "attention_mask") and torch.is_tensor(value):
                tensors.setdefault(key, []).append(value)
    return expansions, {k: torch.cat(v, dim=0) for k, v in tensors.items()}


def encode_chunked_batch(processor: Any, texts: Sequence[str],
                         images: Sequence[Sequence[Any]], image_token: str, *,
                         padding_side: str = "left", **kwargs: Any) -> dict[str, Any]:
    """A padded batch (`input_ids`, `attention_mask`, image tensors) of texts tokenized with
    `tokenize_image_chunks`; what `processor(text=texts, images=..., padding=True)` returns
    for formats that tokenize like LLaVA.

    `kwargs` go to the processor's per-image calls.
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    rows: list[list[int]] = []
    image_inputs: dict[str, list[Any]] = {}
    for text, row_images in zip(texts, images, strict=True):
        expansions, tensors = image_expansions(processor, row_images, image_token, **kwargs)
        rows.append(tokenize_image_chunks(tokenizer, text, image_token, expansions)[0])
        for key, value in tensors.items():
            image_inputs.setdefault(key, []).append(value)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad] * fill + row if padding_side == "left" else row + [pad] * fill)
        ones = [1] * len(row)
        mask.append([0] * fill + ones if padding_side == "left" else ones + [0] * fill)
    batch: dict[str, Any] = {"input_ids": torch.tensor(ids, dtype=torch.long),
                             "attention_mask": torch.tensor(mask, dtype=torch.long)}
    batch.update({k: torch.cat(v, dim=0) for k, v in image_inputs.items()})
    return batch
