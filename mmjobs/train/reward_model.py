"""Reward models: a VLM with a scalar value head, its Bradley-Terry objective, export and loading.

    rm = load_reward_model("s3://b/exp/run/rm/final/reward_model")
    rm.score([{"role": "user", "content": "<image>\\nWhat is the largest value?"}], "42.",
             images=[png_bytes])                                       # -> float

**Model.** `RewardModel` runs the VLM's trunk (`XForConditionalGeneration.model`: vision tower,
connector and decoder, no LM head — a reward needs no vocabulary logits) and applies
`value_head = Linear(hidden, 1)` to the final hidden state of each row's last non-pad token,
which has attended to the whole prompt and response. With LoRA the adapters sit inside the
VLM and the value head trains in full next to them (peft's `modules_to_save` semantics: new,
small, trained whole, saved with the adapter). The unused LM head is frozen.

**Loss.** Bradley-Terry on pairs: `-log sigmoid(r_chosen - r_rejected)`, plus optionally
`c * (r_chosen + r_rejected)^2` to keep rewards centred (TRL's `center_rewards_coefficient`;
PPO prefers rewards near 0), or `c * (r_chosen^2 + r_rejected^2) / 2`, Align-Anything's
`regularization` (its rm trainer: the mean of the stacked squared rewards). Pairwise
accuracy = fraction of pairs with r_chosen > r_rejected.

**Export** (`final/reward_model/`)::

    adapter/ or model/         the VLM: peft adapter (LoRA) or full model with its processor
    value_head.safetensors     {"weight": [1, hidden], "bias": [1]} float32
    reward_model.json          format, base model, which weights, hidden size, score token
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmjobs.config import ModelConfig
from mmjobs.layout import REWARD_MODEL_DIR, VALUE_HEAD_FILE
from mmjobs.logs import get_logger
from mmjobs.train.batches import IGNORE_INDEX
from mmjobs.train.methods import RmConfig, RmPreference

log = get_logger(__name__)

CONFIG_FILE = "reward_model.json"
FORMAT = "mmjobs.reward_model/v1"
RM_STATS = ("reward_chosen", "reward_rejected", "reward_margin", "accuracy",
            "response_len_chosen", "response_len_rejected")
InputsFn = Callable[[Mapping[str, Any]], dict[str, Any]]


def _base(vlm: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the same modules, adapters injected)."""
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


class RewardModel(nn.Module):
    """A VLM (plain or peft-wrapped) plus a scalar value head; see the module docstring.

    Args:
        vlm: e.g. `LlavaForConditionalGeneration`, or the `PeftModel` around it.
        init_head: draw the head's initial weights (training); False when weights are loaded.

    Raises:
        ValueError: the VLM has no `.model` trunk returning `last_hidden_state`.
    """

    def __init__(self, vlm: nn.Module, *, init_head: bool = True) -> None:
        super().__init__()
        base = _base(vlm)
        if not isinstance(getattr(base, "model", None), nn.Module):
            raise ValueError(f"{type(base).__name__} has no `.model` trunk (vision + decoder "
                             "without the LM head); reward models need one")
        self.vlm = vlm
        self.hidden_size = int(base.config.get_text_config().hidden_size)
        self.value_head = nn.Linear(self.hidden_size, 1)  # float32: rewards are small numbers
        if init_head:
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(self.hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)
        self._freeze_lm_head(base)
        self.scorer: RewardScorer | None = None

    @staticmethod
    def _freeze_lm_head(base: nn.Module) -> None:
        # Never used here; trainable it would get no gradient, which DDP reports as an error.
        head, embed = base.get_output_embeddings(), base.get_input_embeddings()
        tied = {id(p) for p in embed.parameters()} if embed is not None else set()
        for param in head.parameters() if head is not None else ():
            if id(param) not in tied:
                param.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **inputs: Any) -> torch.Tensor:
        """Rewards of a right- or left-padded batch.

        Args:
            input_ids: [N, T]; attention_mask: [N, T] (1 on real tokens); other VLM inputs
                (pixel_values [sum images, C, H, W], ...) as keywords.

        Returns:
            [N] float32 rewards, one per row.
        """
        trunk = _base(self.vlm).model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       **inputs).last_hidden_state  # [N, T, H]
        n, t = input_ids.shape
        if attention_mask is None:
            last = torch.full((n,), t - 1, device=hidden.device)
        else:  # the last 1 of each row, whichever side the padding is on
            last = t - 1 - attention_mask.flip(1).to(torch.int64).argmax(dim=1)
        picked = hidden[torch.arange(n, device=hidden.device), last.to(hidden.device)]  # [N, H]
        return self.value_head(picked.to(self.value_head.weight.dtype)).squeeze(-1)

    def token_values(self, positions: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None,
                     **inputs: Any) -> torch.Tensor:
        """The value head at every position of `positions`: a reward model used as PPO's
        critic (Align-Anything's reward_critic scores each position the same way).

        Args:
            positions: [n, R] positions of each row whose hidden state is scored (PPO: the
                logit positions predicting the response tokens).
            input_ids, attention_mask, **inputs: as for `forward`.

        Returns:
            [n, R] float32 values.
        """
        trunk = _base(self.vlm).model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       **{**inputs, "use_cache": False}).last_hidden_state  # [n, T, H]
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        picked = hidden[rows, positions.to(hidden.device)]  # [n, R, H]
        return self.value_head(picked.to(self.value_head.weight.dtype)).squeeze(-1)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, prompt: str | Sequence[Mapping[str, str]], response: str,
              images: Sequence[Any] = ()) -> float:
        """The reward of one response (see `score_batch`)."""
        return self.score_batch([(prompt, response, images)])[0]

    @torch.no_grad()
    def score_batch(self, items: Sequence[tuple[Any, str, Sequence[Any]]]) -> list[float]:
        """Rewards of `(prompt, response, images)` triples, encoded like the training pairs.

        `prompt`: a user message string or a list of `{"role", "content"}` turns, with one
        `<image>` per image; `images`: encoded bytes or PIL images, in `<image>` order.

        Raises:
            RuntimeError: the model was not made by `load_reward_model` (no processor).
            SampleRejected: an item has the wrong image count or is too long.
        """
        if self.scorer is None:
            raise RuntimeError("this RewardModel has no processor attached; load it with "
                               "load_reward_model()")
        batch = self.scorer.batch(items)
        device = self.value_head.weight.device
        dtype = next(p.dtype for p in self.vlm.parameters() if p.is_floating_point())
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                  for k, v in batch.items() if torch.is_tensor(v) and k not in
                  ("labels", "num_images")}
        return [float(r) for r in self(**inputs, use_cache=False)]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       center_coef: float = 0.0, l2_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss, [B], from rewards [B] and [B] (see the module docstring).

    `center_coef` weights TRL's (r_c + r_r)^2; `l2_coef` Align-Anything's (r_c^2 + r_r^2) / 2,
    whose mean over the pairs is its `stack([r_r, r_c]).square().mean()`.
    """
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    if l2_coef:
        losses = losses + l2_coef * (chosen_rewards ** 2 + rejected_rewards ** 2) / 2
    return losses


class RewardObjective:
    """The reward-model objective for `TrainRecipe` on `PreferenceCollator` batches
    (rows 0..B-1 chosen, B..2B-1 rejected)."""

    name = "rm"
    stat_names = RM_STATS

    def __init__(self, cfg: RmPreference, inputs: InputsFn) -> None:
        self.cfg, self.inputs = cfg, inputs

    def count(self, batch: Mapping[str, Any]) -> int:
        """Pairs in `batch`: the loss is a mean over pairs."""
        return len(batch["ids"])

    def loss(self, model: nn.Module, batch: Mapping[str, Any]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the pairs' losses, sums of `RM_STATS` over the pairs)."""
        pairs = self.count(batch)
        rewards = model(**self.inputs(batch))  # [2B]
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        losses = bradley_terry_loss(chosen, rejected, center_coef=self.cfg.rm_center_rewards_coef,
                                    l2_coef=self.cfg.rm_regularization)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).float()
        c, r = chosen.detach(), rejected.detach()
        stats = {"reward_chosen": c.sum(), "reward_rejected": r.sum(),
                 "reward_margin": (c - r).sum(), "accuracy": (c > r).float().sum(),
                 "response_len_chosen": tokens[:pairs].sum(),
                 "response_len_rejected": tokens[pairs:].sum()}
        return losses.sum(), stats


# --------------------------------------------------------------------------- export / load


def export_reward_model(model: RewardModel, full_state: dict[str, torch.Tensor] | None,
                        cfg: RmConfig, out: Path, *, base_model: ModelConfig, processor: Any,
                        source_dir: Path | None, meta: dict[str, Any]) -> dict[str, str]:
    """Write `out/reward_model/` (rank 0 only); see the module docstring.

    Args:
        model: the unwrapped trained `RewardModel`.
        full_state: the gathered state dict under ZeRO-3 (keys `vlm.*`, `value_head.*`), else
            None.
        base_model: the spec the VLM was loaded from (adapters are applied to it on load).
        meta: extra JSON-able fields for `reward_model.json` (data, step, max_length, ...).

    Returns:
        `{"reward_model": "reward_model"}`.
    """
    from safetensors.torch import save_file

    from mmjobs.train.model_setup import export_final

    target = out / REWARD_MODEL_DIR
    vlm_state = head_state = None
    if full_state is not None:
        vlm_state = {k.removeprefix("vlm."): v for k, v in full_state.items()
                     if k.startswith("vlm.")}
        head_state = {k.removeprefix("value_head."): v for k, v in full_state.items()
                      if k.startswith("value_head.")}
    head_state = head_state or model.value_head.state_dict()
    parts = export_final(model.vlm, vlm_state, cfg, target, processor=processor,
                         source_dir=source_dir)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in
               head_state.items()}, str(target / VALUE_HEAD_FILE))
    info = {"format": FORMAT, "base_model": base_model.model_dump(mode="json"),
            "weights": next(iter(parts.values())), "finetune": cfg.finetune,
            "hidden_size": model.hidden_size, "value_head": VALUE_HEAD_FILE,
            "score_token": "last_non_pad", **meta}
    (target / CONFIG_FILE).write_text(json.dumps(info, indent=1))
    return {"reward_model": REWARD_MODEL_DIR}


class RewardScorer:
    """Encodes `(prompt, response, images)` like pretokenize did for training pairs."""

    def __init__(self, model_dir: Path, image_processor: Any, *, max_length: int,
                 trust_remote_code: bool = False, conversation_format: str = "auto") -> None:
        from mmjobs.data.images import processor_min_edge
        from mmjobs.data.loader import PaddedCollator
        from mmjobs.data.sample_encoder import SampleEncoder

        self.encoder = SampleEncoder(model_dir, max_length=max_length,
                                     trust_remote_code=trust_remote_code,
                                     conversation_format=conversation_format)
        self.image_processor = image_processor
        self.image_min_edge = processor_min_edge(image_processor)  # as the training loader
        self.collate = PaddedCollator(self.encoder.tokenizer.pad_token_id or 0)

    def batch(self, items: Sequence[tuple[Any, str, Sequence[Any]]]) -> dict[str, Any]:
        """A padded batch (`PaddedCollator` layout) of the items."""
        from mmjobs.data.loader import _decode_image, run_image_processor

        min_edge = self.image_min_edge
        rows = []
        for k, (prompt, response, images) in enumerate(items):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
                {"role": t["role"], "content": t["content"]} for t in prompt]
            data = [_image_bytes(im) for im in images]
            enc = self.encoder.encode_messages(f"item-{k}", [
                *turns, {"role": "assistant", "content": response}], data, last_turn_only=True)
            row: dict[str, Any] = {"id": enc.id, "input_ids": enc.input_ids,
                                   "labels": enc.labels, "num_images": len(enc.images)}
            if enc.images:  # decoded exactly like the training loader decodes shard bytes
                row["image_features"] = run_image_processor(
                    self.image_processor, [_decode_image(b, enc.id, min_edge) for b in enc.images])
            rows.append(row)
        return self.collate(rows)


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    buf = io.BytesIO()  # a PIL image: lossless PNG keeps its pixels
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_reward_model(uri: str, *, device: str | torch.device | None = None,
                      max_length: int | None = None) -> RewardModel:
    """Load an exported reward model (`final/reward_model/`, or the `final/` holding it).

    Returns a `RewardModel` in eval mode without gradients, with a processor attached so
    `score` / `score_batch` take raw prompts, responses and images.

    Args:
        uri: local path or s3:// URI of the export.
        device: where to put it (None: CPU).
        max_length: longest item `score` accepts (default: the training data's max_length).

    Raises:
        ValueError: not a reward model export (no reward_model.json) or an unknown format.
    """
    from safetensors.torch import load_file

    from mmjobs.models.builder import load_model, resolve_model_dir

    root = resolve_model_dir(uri)
    if not (root / CONFIG_FILE).is_file() and (root / REWARD_MODEL_DIR / CONFIG_FILE).is_file():
        root = root / REWARD_MODEL_DIR
    if not (root / CONFIG_FILE).is_file():
        raise ValueError(f"{uri}: no {CONFIG_FILE}; point at a train stage's "
                         f"final/{REWARD_MODEL_DIR} (train.mode: rm)")
    info = json.loads((root / CONFIG_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{uri}: reward model format {info.get('format')!r}, this mmjobs reads "
                         f"{FORMAT}")
    spec = ModelConfig(**info["base_model"])
    if info["weights"] == "adapter":
        from peft import PeftModel

        loaded = load_model(spec, for_training=False, device=device)
        vlm: nn.Module = PeftModel.from_pretrained(loaded.model, str(root / "adapter"))
    else:
        spec = spec.model_copy(update={"name_or_path": str(root / info["weights"])})
        loaded = load_model(spec, for_training=False, device=device)
        vlm = loaded.model
    model = RewardModel(vlm, init_head=False)
    model.value_head.load_state_dict(load_file(str(root / info["value_head"])))
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    model.scorer = RewardScorer(loaded.model_dir, getattr(loaded.processor, "image_processor",
                                                          None),
                                max_length=max_length or int(info.get("max_length") or 4096),
                                trust_remote_code=spec.trust_remote_code,
                                # the recipe's model.conversation_format, as its shards had
                                conversation_format=spec.conversation_format)
    log.info("loaded reward model %s (%s weights on %s)", uri, info["weights"],
             spec.name_or_path)
    return model


def load_critic(uri: str, *, freeze_parts: Mapping[str, bool],
                gradient_checkpointing: bool = False) -> RewardModel:
    """A trainable copy of the reward model export at `uri`: PPO's separate critic,
    initialised from the reward model (Align-Anything's `reward_critic_model_name_or_path`).

    The VLM trains in full (a LoRA reward model's adapters are merged into it first); the
    components `freeze_parts` marks (`mmjobs.train.model_setup.frozen_components`) and the
    unused LM head stay frozen.

    Raises:
        ValueError: not a reward model export (see `load_reward_model`).
    """
    from mmjobs.models.builder import freeze

    model = load_reward_model(uri)
    if hasattr(model.vlm, "merge_and_unload"):  # peft: train the merged weights in full
        model.vlm = model.vlm.merge_and_unload()
    model.scorer = None  # scores come from `token_values` on the rollout's own tokens
    base = _base(model.vlm)
    model.train().requires_grad_(True)
    freeze(base, **freeze_parts)
    RewardModel._freeze_lm_head(base)
    text_config = base.config.get_text_config()
    if hasattr(text_config, "use_cache"):
        text_config.use_cache = False
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
