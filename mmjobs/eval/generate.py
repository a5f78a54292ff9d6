"""Batched generation for vision-language models: chat template, left padding, KV cache.

    loaded = load_for_inference("s3://models/llava-1.5-7b", adapter="s3://runs/x/train")
    gen = Generator(loaded, batch_size=16, max_new_tokens=64, stop_strings=["\\n\\n"])
    answers = gen.generate([PromptInput("<image>\\nWhat is the largest bar?", [image])])

The seeds' eval scripts generate one sample at a time; here prompts are sorted by length within
a window (so a batch pads little), batched with LEFT padding (every row's last prompt token sits
at the same position, where generation continues), generated with the KV cache, decoded from
the new tokens only, and returned in input order. Greedy output equals one-at-a-time greedy
output up to floating-point ties (tests/unit/eval/test_generate.py checks it on the tiny LLaVA).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmjobs import storage
from mmjobs.config import ModelConfig
from mmjobs.data.images import processor_min_edge
from mmjobs.data.records import IMAGE_TOKEN
from mmjobs.logs import get_logger
from mmjobs.models.builder import LoadedModel, fetch_dir, load_model

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["BatchOutput", "Generator", "PromptInput", "load_for_inference", "load_image",
           "trim_at_stop"]

log = get_logger(__name__)


@dataclass
class PromptInput:
    """One prompt.

    Attributes:
        prompt: the user's text (one user turn), or a conversation: turns with `role` and
            `content` (dicts or `mmjobs.data.records.Turn`), ending with a user turn. `<image>`
            marks where each image goes, in order.
        images: the images, one per `<image>` marker.
    """

    prompt: str | Sequence[Any]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class BatchOutput:
    """What one batch produced.

    Attributes:
        indices: positions of the batch's prompts in the list given to `generate_batches`.
        texts: decoded answers, same order as `indices`.
        new_tokens: generated tokens per answer (up to and including EOS, before trimming).
    """

    indices: list[int]
    texts: list[str]
    new_tokens: list[int]


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` cut before the first occurrence of any stop string.

    Generation stops on a stop string only at a token boundary and the matching text is still
    decoded, so the answer is trimmed here too.
    """
    cut = min((i for s in stop_strings if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def load_image(uri: str | os.PathLike, min_edge: int | None = None) -> Image.Image:
    """Read an image from the store (local path or s3://) as RGB; a large JPEG at the reduced
    scale that still covers `min_edge`, as the training loader decodes it."""
    from mmjobs.data.images import decode_rgb

    # The same conversion as training (16-bit scaled, transparency over white).
    return decode_rgb(storage.read_bytes(uri), min_edge)


class Generator:
    """Generates answers for batches of prompts with one loaded model.

    Answers are decoded from the new tokens only (special tokens skipped), cut at the first
    stop string and stripped of surrounding whitespace. The constructor sets the (shared)
    tokenizer's `padding_side` to "left", and its pad token to EOS if it has none.

    Args:
        loaded: the model and its processor (`load_for_inference` or `load_model`).
        batch_size: prompts per `generate` call.
        max_new_tokens: generation budget per answer.
        do_sample: sample (with `temperature`, `top_p`, `top_k`) instead of greedy/beam search.
        temperature, top_p, top_k: sampling parameters; `top_k=0` disables top-k.
        num_beams: beam search width (1: none).
        stop_strings: stop an answer at any of these; the answer is trimmed before it.
        seed: torch seed set for each `generate_batches` call (sampling is reproducible for the
            same prompts and batch size; the global RNG state is restored afterwards).
        sort_window: prompts sorted by length together; default `8 * batch_size`. Larger
            windows pad less; order is restored either way.
        conversation_format: how prompts are rendered (`mmjobs.data.conversation`); default
            `loaded.info["conversation_format"]` (set by `load_for_inference`), else auto.
            The format's stop strings and stop tokens are added to the stops.

    Raises:
        ValueError: a parameter is out of range (all problems in one message), or the format
            cannot be used with this model.
    """

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 16, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, num_beams: int = 1, stop_strings: Sequence[str] = (),
                 seed: int = 0, sort_window: int | None = None,
                 conversation_format: str | None = None) -> None:
        problems = [msg for bad, msg in [
            (batch_size < 1, f"batch_size={batch_size} must be >= 1"),
            (max_new_tokens < 1, f"max_new_tokens={max_new_tokens} must be >= 1"),
            (do_sample and temperature <= 0, f"temperature={temperature} must be > 0 when "
             "sampling (use do_sample=false for greedy decoding)"),
            (not 0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"),
            (top_k < 0, f"top_k={top_k} must be >= 0 (0 disables top-k)"),
            (num_beams < 1, f"num_beams={num_beams} must be >= 1"),
            (loaded.processor is None, f"{loaded.model_dir}: the model has no processor or "
             "tokenizer files; generation needs them"),
        ] if bad]
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.batch_size = batch_size
        self.format = _conversation_format(loaded, conversation_format)
        format_stops = list(self.format.stop_strings) if self.format else []
        self.stop_strings = list(dict.fromkeys(s for s in [*stop_strings, *format_stops] if s))
        self.seed = seed
        self.sort_window = sort_window or 8 * batch_size
        self.takes_images = hasattr(self.processor, "image_processor")
        # Prompt images decode at the scale this processor needs, as in training.
        self.image_min_edge = (processor_min_edge(self.processor.image_processor)
                               if self.takes_images else None)
        # Left padding: with right padding the pad tokens would sit between a short prompt and
        # its answer, and the model would continue after them.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.generation_config = self._generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, top_k=top_k, num_beams=num_beams)

    def _generation_config(self, *, do_sample: bool, temperature: float, top_p: float,
                           top_k: int, **params: Any) -> Any:
        from transformers import GenerationConfig

        defaults = getattr(self.model, "generation_config", None)
        eos = getattr(defaults, "eos_token_id", None)
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        if self.format and self.format.stop_tokens:  # e.g. Chameleon's <reserved08706>
            ids = [self.tokenizer.convert_tokens_to_ids(t) for t in self.format.stop_tokens]
            known = eos if isinstance(eos, list) else [eos] if eos is not None else []
            eos = list(dict.fromkeys([*known, *(i for i in ids if i is not None)]))
        config = GenerationConfig(
            do_sample=do_sample, use_cache=True,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id, **params)
        if do_sample:  # only then: greedy decoding with sampling params set logs warnings
            config.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if self.stop_strings:
            config.stop_strings = self.stop_strings
        return config

    # ----------------------------------------------------------------------- prompts

    def render(self, prompt: PromptInput) -> str:
        """The prompt as the model sees it: its conversation format's generation prompt.

        With the model's chat template, turns become string content or content parts,
        whichever the template renders (`mmjobs.data.conversation.template`). A model with
        no template and no format set gets the turns' text joined, `<image>` replaced by the
        processor's image token.

        Raises:
            mmjobs.data.conversation.FormatMismatch: the format cannot render the turns.
        """
        turns = _turns(prompt.prompt)
        if self.format is not None:
            return self.format.render_prompt(turns)
        image_token = getattr(self.processor, "image_token", None) or IMAGE_TOKEN
        return "\n".join(t["content"] for t in turns).replace(IMAGE_TOKEN, image_token)

    def _encode(self, texts: list[str], images: list[list[Image.Image]]) -> Mapping[str, Any]:
        """Tokenize + process a batch: `input_ids`/`attention_mask` `[B, L]` (left-padded),
        `pixel_values` `[num_images, C, H, W]` for LLaVA-style processors."""
        if self.format is not None and self.format.image_chunks:  # tokenized as LLaVA does
            from mmjobs.data.conversation.chunks import encode_chunked_batch

            image_token = getattr(self.processor, "image_token", None) or IMAGE_TOKEN
            batch = encode_chunked_batch(self.processor, texts, images, image_token,
                                         piece_break=self.format.piece_break)
            return self._to_device(batch)
        bos = self.tokenizer.bos_token
        # A template that renders BOS itself must not get a second one from the tokenizer.
        kwargs: dict[str, Any] = {
            "return_tensors": "pt", "padding": True,
            "add_special_tokens": not (bos and all(t.startswith(bos) for t in texts))}
        if hasattr(self.processor, "return_for_text_completion"):
            # As pretokenize encodes prompts (mmjobs.data.sample_encoder): without the chat-mode
            # separator Chameleon's processor appends by default, so generation continues from
            # the prompt the model was trained on.
            kwargs["return_for_text_completion"] = True
        flat = [image for row in images for image in row]
        if flat:
            if not self.takes_images:
                raise ValueError(f"{self.loaded.model_dir}: prompts have images but the model's "
                                 "processor takes none (only a tokenizer was found)")
            kwargs["images"] = flat
        return self._to_device(self.processor(text=texts, **kwargs))

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch on the model's device; images in the model's dtype, ids stay integers."""
        batch = dict(batch)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return {k: v.to(self.model.device) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _order(self, prompts: Sequence[PromptInput], texts: list[str]) -> list[int]:
        """Prompt indices, sorted within each window by (images, text tokens), longest first.

        Longest first: a batch that does not fit in memory fails in the first minute. Images
        count separately because each expands to many tokens in the processor.
        """
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order: list[int] = []
        for start in range(0, len(prompts), self.sort_window):
            window = range(start, min(start + self.sort_window, len(prompts)))
            order += sorted(window, key=lambda i: (-len(prompts[i].images), -lengths[i]))
        return order

    # ----------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[PromptInput]) -> list[str]:
        """Answers for `prompts`, in input order."""
        answers = [""] * len(prompts)
        for out in self.generate_batches(prompts):
            for i, text in zip(out.indices, out.texts, strict=True):
                answers[i] = text
        return answers

    def generate_batches(self, prompts: Sequence[PromptInput]) -> Iterator[BatchOutput]:
        """Generate batch by batch (length-sorted order), yielding each batch's answers."""
        if not prompts:
            return
        texts = [self.render(p) for p in prompts]
        order = self._order(prompts, texts)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for start in range(0, len(order), self.batch_size):
                indices = order[start:start + self.batch_size]
                yield self._batch(indices, [texts[i] for i in indices],
                                  [prompts[i].images for i in indices])

    def _batch(self, indices: list[int], texts: list[str],
               images: list[list[Image.Image]]) -> BatchOutput:
        """One batch's output (subclasses add parts, e.g. decoded images)."""
        answers, counts = self._generate_batch(texts, images)
        return BatchOutput(indices, answers, counts)

    @torch.inference_mode()
    def _generate_batch(self, texts: list[str], images: list[list[Image.Image]]
                        ) -> tuple[list[str], list[int]]:
        batch = self._encode(texts, images)
        extra = {"tokenizer": self.tokenizer} if self.stop_strings else {}
        output = self.model.generate(**batch, generation_config=self.generation_config, **extra)
        # `output` is [B, L + new]: the left-padded prompt, then the new tokens.
        new = output[:, batch["input_ids"].shape[1]:]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers = [trim_at_stop(text, self.stop_strings).strip() for text in decoded]
        return answers, _count_new_tokens(new, self.tokenizer.pad_token_id)


def _count_new_tokens(new: torch.Tensor, pad_id: int | None) -> list[int]:
    """Per row of `new` `[B, T]`: tokens before the trailing padding (finished rows are padded)."""
    if pad_id is None:
        return [new.shape[1]] * new.shape[0]
    not_pad = (new != pad_id).int()
    # Position of the last non-pad token + 1; a row of only pads counts 0.
    last = torch.where(not_pad.any(dim=1),
                       new.shape[1] - not_pad.flip(dims=[1]).argmax(dim=1),
                       torch.zeros(new.shape[0], dtype=torch.long, device=new.device))
    return last.tolist()


def _turns(prompt: str | Sequence[Any]) -> list[dict[str, str]]:
    """The prompt as `[{role, content}]` turns (a string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    turns = [t if isinstance(t, Mapping) else t.model_dump() for t in prompt]
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a prompt conversation must end with a user turn (the model answers "
                         f"it); got roles {[t['role'] for t in turns]}")
    return turns


def _conversation_format(loaded: LoadedModel, name: str | None) -> Any:
    """The resolved format for `loaded`; None for `auto` on a model without any template
    (prompts are then the turns' text joined, as before formats existed)."""
    from mmjobs.data.conversation import NoChatTemplateError, resolve_format

    name = name or loaded.info.get("conversation_format") or "auto"
    if loaded.processor is None:
        return None
    try:
        return resolve_format(name, loaded.processor, where=str(loaded.model_dir))
    except NoChatTemplateError:
        if name != "auto":
            raise
        log.warning("%s: no chat template and no conversation_format: prompts are the turns' "
                    "text joined by newlines; set conversation_format", loaded.model_dir)
        return None


# --------------------------------------------------------------------------- loading


# Models mmjobs implements itself ship no chat template; `auto` means their own turn format.
NATIVE_FORMATS = {"lavin": "lavin", "internlmxcomposer2": "internlm_xcomposer2"}


def load_for_inference(model: str, adapter: str | None = None, *,
                       trust_remote_code: bool = False, dtype: str = "auto",
                       device: str | torch.device | None = None,
                       merge: bool | None = None,
                       conversation_format: str = "auto") -> LoadedModel:
    """Load a model for generation: a merged model, or a base model plus a LoRA adapter (or
    LaVIN's MMA adapters, `train.finetune: mma`, over a LaVIN base).

    Args:
        model: the (base) model: local dir, s3:// committed dir or hub id (see `load_model`).
        adapter: a peft adapter dir, or a training output holding one under `final/adapter`
            or `adapter` (local or s3://; s3 adapters are fetched and verified like models).
        trust_remote_code, dtype: as in `ModelConfig`.
        device: default CUDA when available, else CPU.
        merge: fold the adapter into the weights after loading, so generation runs at the
            base model's speed (LoRA adds two small matmuls per target layer otherwise).
            Default: merge float32 models only; in bf16/fp16, W + B·A would round much of the
            small LoRA update away, so the adapter stays separate.
        conversation_format: recorded in `info`; `Generator`s of this model render prompts
            with it (see `mmjobs.data.conversation`).

    Returns:
        The `LoadedModel`, in eval mode; `info` gains `conversation_format`, `adapter` and
        `adapter_merged`.
    """
    target = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    spec = ModelConfig(name_or_path=model, trust_remote_code=trust_remote_code, dtype=dtype)
    loaded = load_model(spec, for_training=False, device=target)
    lavin = loaded.info.get("model_type") == "lavin"
    if conversation_format == "auto":  # no chat template: the model's own turn layout
        conversation_format = NATIVE_FORMATS.get(loaded.info.get("model_type"), "auto")
    loaded.info["conversation_format"] = conversation_format
    if adapter is None:
        return loaded
    from peft import PeftModel

    from mmjobs.models.model_dirs import locate_adapter

    adapter_dir = fetch_dir(locate_adapter(adapter), kind="adapters")
    if lavin:  # MMA adapters replace the initial ones in place (nothing to fold: see compose)
        from mmjobs.models.lavin.compose import load_adapters

        tensors = load_adapters(loaded.model, adapter_dir)
        loaded.info.update(adapter=adapter, adapter_merged=False, adapter_tensors=tensors)
        log.info("loaded %d LaVIN adapter tensors from %s", tensors, adapter)
        return loaded
    peft_model = PeftModel.from_pretrained(loaded.model, adapter_dir, is_trainable=False)
    peft_model.eval()
    if merge is None:
        merge = loaded.model.dtype == torch.float32
    loaded.model = peft_model.merge_and_unload() if merge else peft_model
    loaded.info.update(adapter=adapter, adapter_merged=merge)
    log.info("applied adapter %s%s", adapter, " (merged)" if merge else "")
    return loaded
