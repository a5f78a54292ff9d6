"""Rollouts for PPO and GRPO: responses sampled for pretokenized multimodal prompts, their
rewards, and the log-probs of the sampled tokens.

One rollout (`ResponseSampler.sample`):

1. The loader's prompt batch (prompt shards, see `mmjobs.data.pretokenized`: right-padded ids,
   images as `pixel_values`) is repeated `num_generations` times per prompt, images included,
   and LEFT-padded, so every row's last prompt token sits at the position generation continues
   from.
2. `model.generate` samples up to `max_new_tokens` tokens per row with the KV cache, at
   `temperature`, from the full distribution (no top-k/top-p truncation, so the log-probs
   computed later are exactly those of the sampling distribution). Tokens that must never be
   generated — the image placeholder of LLaVA-style models, which would then lack image
   features, and a pad token distinct from EOS — are suppressed in sampling and in the
   log-probs alike (`response_logps`). Sampling draws from torch's global RNG, which
   checkpoints save per rank, so a resumed run samples exactly the responses the interrupted
   one would have.
3. A response ends after its first end-of-sequence token (`finished`); one that reaches
   `max_new_tokens` first is truncated.
4. The scored sequences are prompt + response, RIGHT-padded — the layout SFT, DPO and the
   reward model train on — with `positions[i, t]` the logit position that predicts response
   token t (prompt length - 1 + t); models compute logits only there (`logits_to_keep`).

Why not `mmjobs.eval.generate.Generator`: a rollout needs the token ids (not text), the
pretokenized prompts (image tokens already in place for Chameleon), the model being trained
(peft/DDP/DeepSpeed-wrapped) and the training RNG stream; it shares Generator's approach
(left padding, KV cache) but calls `generate` on ids directly.

Rewards (`build_reward`, config `train.rl.reward`): a reward model from the rm mode, scoring
the policy's own tokens exactly as it scored its training pairs (`ModelReward`), or a
programmatic reward on the decoded text (`LengthReward`, `KeywordReward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmjobs.logs import get_logger
from mmjobs.train.batches import IGNORE_INDEX
from mmjobs.train.methods import RewardConfig

log = get_logger(__name__)

# Keys of a collated batch that are not per-image tensors.
_ROW_KEYS = frozenset({"input_ids", "labels", "attention_mask", "num_images", "ids",
                       "position_ids", "seq_lens", "cu_seqlens", "max_seqlen"})


def image_features(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The image tensors of a collated batch (`pixel_values`, ...; dim 0 = images)."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in _ROW_KEYS}


def select_images(images: Mapping[str, torch.Tensor], index: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """The images `index` of each image tensor; none at all for an empty index (a vision
    tower cannot run on zero images)."""
    if not len(index):
        return {}
    return {k: v[index.to(v.device)] for k, v in images.items()}


def image_index(num_images: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Indices into a batch's concatenated images of the images of `rows`, in row order."""
    offsets = [0, *torch.cumsum(num_images.cpu(), 0).tolist()]
    parts = [torch.arange(offsets[r], offsets[r + 1]) for r in rows]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@dataclass
class RolloutSlice:
    """Rows of a rollout, ready for a forward pass.

    `batch` holds the model inputs (`input_ids`, `attention_mask` [n, L'] trimmed to the
    longest row, `num_images`, image tensors); the rest is per response token, [n, R].
    """

    batch: dict[str, Any]
    positions: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Rollout:
    """Sampled responses, one row each (N = prompts x num_generations, G rows per prompt in a
    row). Per-token tensors are [N, R], R = the longest response.

    Attributes:
        input_ids, attention_mask: [N, L] prompt + response, right-padded.
        images: image tensors of all rows, concatenated in row order.
        num_images: [N] images per row.
        prompt_lengths: [N] prompt tokens of each row.
        positions: [N, R] logit position predicting response token t (clamped to L - 1).
        response_ids: [N, R] sampled tokens, an end token repeated after the end.
        mask: [N, R] float, 1 on response tokens (the end token included).
        finished: [N] bool, the response ended with an end-of-sequence token.
        prompt_ids: id of each row's prompt.
        texts: decoded responses (special tokens skipped).
        tensors: per-row / per-token results added by the trainer (scores, old log-probs,
            reference log-probs, values, advantages, returns).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: dict[str, torch.Tensor]
    num_images: torch.Tensor
    prompt_lengths: torch.Tensor
    positions: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    prompt_ids: list[str]
    texts: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        """[N] response tokens (the end token included)."""
        return self.mask.sum(dim=1).to(torch.int64)

    def rows(self, rows: torch.Tensor | Sequence[int]) -> RolloutSlice:
        """The rows `rows` as a `RolloutSlice` (their per-token `tensors` included)."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max()) if len(index) else 0
        images = image_index(self.num_images, index.tolist())
        batch: dict[str, Any] = {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "num_images": self.num_images[index],
            **select_images(self.images, images),
        }
        return RolloutSlice(batch=batch, positions=self.positions[index],
                            response_ids=self.response_ids[index], mask=self.mask[index],
                            tensors={k: v[index.to(v.device)] for k, v in self.tensors.items()})


class ResponseSampler:
    """Samples responses to prompt batches (see the module docstring).

    Args:
        tokenizer: the policy's tokenizer (decoding, pad/eos ids).
        max_new_tokens, temperature: sampling settings (`train.rl`).
        eos_token_ids: tokens that end a response (the model's generation config's).
        suppress_token_ids: tokens never sampled (and masked out of the log-probs).
        synced_gpus: keep ranks generating in lockstep (ZeRO-3 gathers parameters in every
            forward, so a rank that finished early must keep joining).
    """

    def __init__(self, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                 eos_token_ids: Sequence[int], suppress_token_ids: Sequence[int] = (),
                 synced_gpus: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("the model has no end-of-sequence token; rollouts need one to end "
                             "responses")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.suppress_token_ids = sorted({int(t) for t in suppress_token_ids}
                                         - set(self.eos_token_ids))
        self.synced_gpus = synced_gpus

    def generation_config(self) -> Any:
        """Pure sampling: every setting that would reshape the distribution is off."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0, min_p=None,
            typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, num_beams=1, max_new_tokens=self.max_new_tokens,
            min_new_tokens=0, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppress_token_ids or None, use_cache=True)

    @torch.no_grad()
    def sample(self, model: Any, prompts: Mapping[str, Any], generations: int, *,
               device: torch.device, float_dtype: torch.dtype) -> Rollout:
        """Sample `generations` responses per prompt of a `PaddedCollator` prompt batch.

        Args:
            model: the policy to call `generate` on (unwrapped from DDP/DeepSpeed).
            prompts: the loader batch (`input_ids`, `attention_mask` right-padded,
                `num_images`, image tensors, `ids`).
            generations: responses per prompt.
            device, float_dtype: where the inputs go, and the image tensors' dtype.

        Returns:
            A `Rollout` with the responses (no scores or log-probs yet).
        """
        rows = [p for p in range(len(prompts["ids"])) for _ in range(generations)]
        index = torch.tensor(rows, dtype=torch.int64)
        num_images = prompts["num_images"][index]
        images = select_images(image_features(prompts), image_index(prompts["num_images"], rows))
        lengths = prompts["attention_mask"].sum(dim=1)[index]  # [N]
        ids = prompts["input_ids"][index]
        width = int(lengths.max())
        left = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        left_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, n in enumerate(lengths.tolist()):
            left[i, width - n:] = ids[i, :n]
            left_mask[i, width - n:] = 1
        inputs = {k: v.to(device, float_dtype) if v.is_floating_point() else v.to(device)
                  for k, v in images.items()}
        output = model.generate(input_ids=left.to(device), attention_mask=left_mask.to(device),
                                generation_config=self.generation_config(),
                                synced_gpus=self.synced_gpus, **inputs)
        new = output[:, width:].cpu()  # [N, <= max_new_tokens]
        responses, finished = self._cut(new)
        return self._assemble(ids, lengths, responses, finished, images, num_images,
                              [prompts["ids"][p] for p in rows])

    def _cut(self, new: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each row's response through its first end token (or all of it)."""
        is_end = torch.isin(new, torch.tensor(self.eos_token_ids))
        responses, finished = [], []
        for row, ends in zip(new, is_end, strict=True):
            hits = ends.nonzero()
            stop = int(hits[0]) + 1 if len(hits) else len(row)
            responses.append(row[:max(stop, 1)])
            finished.append(bool(len(hits)))
        return responses, torch.tensor(finished, dtype=torch.bool)

    def _assemble(self, ids: torch.Tensor, lengths: torch.Tensor,
                  responses: list[torch.Tensor], finished: torch.Tensor,
                  images: dict[str, torch.Tensor], num_images: torch.Tensor,
                  prompt_ids: list[str]) -> Rollout:
        n = len(responses)
        r_max = max(len(r) for r in responses)
        total = [int(p) + len(r) for p, r in zip(lengths.tolist(), responses, strict=True)]
        width = max(total)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.int64)
        attention = torch.zeros((n, width), dtype=torch.int64)
        # Padded with an end token, never a suppressed one: its log-prob must stay finite
        # (it is masked out, but -inf x 0 would be NaN).
        response_ids = torch.full((n, r_max), self.eos_token_ids[0], dtype=torch.int64)
        mask = torch.zeros((n, r_max), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(lengths.tolist(), responses, strict=True)):
            input_ids[i, :p] = ids[i, :p]
            input_ids[i, p:p + len(r)] = r
            attention[i, :p + len(r)] = 1
            response_ids[i, :len(r)] = r
            mask[i, :len(r)] = 1.0
        positions = (lengths.unsqueeze(1) - 1 + torch.arange(r_max)).clamp(max=width - 1)
        texts = self.tokenizer.batch_decode(
            [r[:-1] if f else r for r, f in zip(responses, finished.tolist(), strict=True)],
            skip_special_tokens=True)
        return Rollout(input_ids=input_ids, attention_mask=attention, images=images,
                       num_images=num_images, prompt_lengths=lengths.to(torch.int64),
                       positions=positions, response_ids=response_ids, mask=mask,
                       finished=finished, prompt_ids=prompt_ids,
                       texts=[t.strip() for t in texts])


def response_logps(logits: torch.Tensor, response_ids: torch.Tensor, *, temperature: float,
                   suppress_token_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the sampling distribution at the response positions.

    Args:
        logits: [n, R, V] logits at `Rollout.positions` (the model's own processing, e.g.
            Chameleon's image-token masking, included).
        response_ids: [n, R] sampled tokens.
        temperature: the sampling temperature.
        suppress_token_ids: tokens the sampler never draws.

    Returns:
        (logps [n, R] float32, with grad if `logits` has it; entropy [n, R] float32, detached).
    """
    from trl.trainer.utils import selective_log_softmax

    scores = logits.float()
    if suppress_token_ids:
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[list(suppress_token_ids)] = True
        scores = scores.masked_fill(banned, float("-inf"))
    logps = selective_log_softmax(scores, response_ids.to(scores.device),
                                  temperature=temperature)
    with torch.no_grad():  # a row at a time: a softmax over [n, R, V] at once can be GBs
        entropy = torch.stack([torch.special.entr(torch.softmax(row / temperature, dim=-1))
                               .sum(dim=-1) for row in scores.detach()])  # entr(0) = 0
    return logps, entropy


# --------------------------------------------------------------------------- rewards

RewardFn = Callable[[Rollout], torch.Tensor]


class LengthReward:
    """1 inside [min_length, max_length] units, falling linearly to 0 at `tolerance` units
    outside. Units: response tokens before the end token, whitespace words, or characters."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg

    def lengths(self, rollout: Rollout) -> torch.Tensor:
        """[N] response lengths in the configured unit."""
        if self.cfg.unit == "tokens":
            return (rollout.response_lengths - rollout.finished.to(torch.int64)).float()
        count = (lambda t: len(t.split())) if self.cfg.unit == "words" else len
        return torch.tensor([float(count(t)) for t in rollout.texts])

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        n = self.lengths(rollout)
        below = (self.cfg.min_length - n).clamp(min=0)
        above = (n - self.cfg.max_length).clamp(min=0)
        return (1.0 - (below + above) / self.cfg.tolerance).clamp(min=0.0)


class KeywordReward:
    """min(occurrences of any keyword, max_count) / max_count, on the decoded response."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.keywords = [k.lower() if cfg.ignore_case else k for k in cfg.keywords if k]

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        counts = []
        for text in rollout.texts:
            text = text.lower() if self.cfg.ignore_case else text
            counts.append(sum(text.count(k) for k in self.keywords))
        return torch.tensor(counts, dtype=torch.float32).clamp(max=self.cfg.max_count) \
            / self.cfg.max_count


class ModelReward:
    """A reward model from the rm mode (`load_reward_model`), scoring the policy's tokens.

    The reward model read each training pair's reward at the last token of
    `prompt + response + the chat template's text after the response` (e.g. a newline after
    `</s>`). A finished response is scored the same way: its tokens (through the end token),
    then that suffix (`template_suffix`), so no re-tokenisation of decoded text can shift what
    it sees. A truncated response is scored as it stands.

    Raises:
        ValueError: the reward model's tokenizer differs from the policy's.
    """

    def __init__(self, uri: str, *, tokenizer: Any, device: torch.device,
                 batch_size: int) -> None:
        from mmjobs.train.reward_model import load_reward_model

        self.model = load_reward_model(uri, device=device)
        assert self.model.scorer is not None
        rm_tokenizer = self.model.scorer.encoder.tokenizer
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"train.rl.reward.model {uri}: its tokenizer differs from the "
                             "policy's; the reward model must come from the same base model "
                             "family (it scores the policy's token ids)")
        self.suffix = template_suffix(self.model.scorer.encoder)
        self.device, self.batch_size = device, batch_size
        self.dtype = next(p.dtype for p in self.model.vlm.parameters() if p.is_floating_point())
        self.pad = int(rm_tokenizer.pad_token_id or 0)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        scores = []
        for start in range(0, rollout.size, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, rollout.size)))
            seqs = []
            for i in rows:
                p, r = int(rollout.prompt_lengths[i]), int(rollout.response_lengths[i])
                seq = rollout.input_ids[i, :p + r].tolist()
                seqs.append(seq + (self.suffix if bool(rollout.finished[i]) else []))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad, dtype=torch.int64)
            mask = torch.zeros((len(seqs), width), dtype=torch.int64)
            for k, s in enumerate(seqs):
                ids[k, :len(s)] = torch.tensor(s)
                mask[k, :len(s)] = 1
            images = select_images(rollout.images, image_index(rollout.num_images, rows))
            extra = {k: v.to(self.device, self.dtype) if v.is_floating_point()
                     else v.to(self.device) for k, v in images.items()}
            scores.append(self.model(ids.to(self.device), mask.to(self.device), use_cache=False,
                                     **extra).float().cpu())
        return torch.cat(scores)


def template_suffix(encoder: Any) -> list[int]:
    """Tokens the chat template puts after an assistant response (its end token included in
    the response): what follows the last labelled token of a probe conversation."""
    enc = encoder.encode_messages("probe", [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Yes"}], [],
                                  last_turn_only=True)
    last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    return list(enc.input_ids[last + 1:])


def build_reward(cfg: RewardConfig, *, tokenizer: Any, device: torch.device,
                 batch_size: int) -> RewardFn:
    """The reward function for `train.rl.reward`: Rollout -> [N] float32 raw scores."""
    if cfg.kind == "length":
        return LengthReward(cfg)
    if cfg.kind == "keyword":
        return KeywordReward(cfg)
    assert cfg.model is not None
    return ModelReward(cfg.model, tokenizer=tokenizer, device=device, batch_size=batch_size)


def final_scores(raw: torch.Tensor, finished: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Raw rewards after `missing_eos_penalty` and `clip` (both optional)."""
    scores = raw.float().clone()
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    if not torch.isfinite(scores).all():
        raise FloatingPointError("the reward is not finite for some responses")
    return scores


def generation_token_ids(loaded_model: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(end-of-sequence ids, ids never to sample) for a loaded VLM.

    Never sampled: the image placeholder token (LLaVA-style models fill it with image
    features, which a generated one would not have; Chameleon writes images as VQ tokens, never
    as placeholders), and a pad token that is not also the end token.
    """
    config = getattr(loaded_model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])
               if e is not None]
    suppress = []
    image_token = getattr(loaded_model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(loaded_model.config, "image_token_index", None)
    if image_token is not None:  # Chameleon's too: its images are VQ tokens, not placeholders
        suppress.append(int(image_token))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        suppress.append(int(tokenizer.pad_token_id))
    return eos_ids, suppress

