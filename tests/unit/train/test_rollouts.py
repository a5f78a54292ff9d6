"""Rollouts on tiny models: prompt-only pretokenization, sampling whose log-probs are exactly
the sampling distribution's (LLaVA with images, Chameleon with VQ image tokens), and a reward
model scoring the policy's tokens as it scored its training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmjobs.config import ModelConfig
from mmjobs.data.sample_encoder import IGNORE_INDEX, SampleEncoder
from mmjobs.models.builder import load_model
from mmjobs.train.batches import model_inputs
from mmjobs.train.methods import RewardConfig, RmConfig
from mmjobs.train.rollouts import (
    ModelReward,
    ResponseSampler,
    build_reward,
    generation_token_ids,
    response_logps,
)
from tests.fixtures_models import tiny_chameleon_dir  # noqa: F401
from tests.integration.train.rl_fixtures import (  # noqa: F401
    build_prompt_shards,
    prompt_records,
    prompt_shards,
)
from tests.shards import read_shards

CPU = torch.device("cpu")


def _rows(shards: str) -> pd.DataFrame:
    return read_shards(shards)


def test_a_prompt_row_is_what_sft_sees_before_the_answer(tiny_llava_dir,
                                                          prompt_shards):  # noqa: F811
    card = json.loads((Path(prompt_shards) / "card.json").read_text())
    assert card["kind"] == "prompt" and card["counts"]["written"] == 8
    assert card["tokens"]["label"] == 0
    encoder = SampleEncoder(tiny_llava_dir, max_length=256)
    records = {r["id"]: r for r in prompt_records(8)}
    for row in _rows(prompt_shards).itertuples():
        assert set(row.labels) == {IGNORE_INDEX} and len(row.images) == 1
        assert row.num_image_tokens == 16
        # The same conversation with an answer, encoded for SFT: the prompt row is exactly
        # its tokens before the first labelled (answer) token.
        full = encoder.encode_messages(row.id, [*records[row.id]["prompt"], {
            "role": "assistant", "content": "The largest bar is 7."}], list(row.images))
        first = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
        assert list(row.input_ids) == full.input_ids[:first]


def test_prompt_rows_with_the_wrong_image_count_are_rejected(tmp_path, tiny_llava_dir):
    records = prompt_records(3)
    records[1]["prompt"][0]["content"] += " <image>"  # two markers, one image
    shards = build_prompt_shards(tmp_path, tiny_llava_dir, records, "bad")
    card = json.loads((Path(shards) / "card.json").read_text())
    assert card["counts"] == {"input": 3, "written": 2, "rejected": 1}
    assert list(card["rejected_by_reason"]) == ["placeholder_mismatch"]


def _sample_and_compare(loaded, batch, *, generations: int, temperature: float):
    """Sample with the rollout sampler, capturing `generate`'s processed scores; return the
    rollout and the largest difference between our log-probs of the sampled tokens and the
    log-softmax of those scores (the distribution the tokens were drawn from)."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    eos, suppress = generation_token_ids(loaded.model, tokenizer)
    sampler = ResponseSampler(tokenizer, max_new_tokens=10, temperature=temperature,
                              eos_token_ids=eos, suppress_token_ids=suppress)
    generate, captured = loaded.model.generate, {}

    def recording_generate(**kwargs):
        config = kwargs.pop("generation_config")
        config.update(output_scores=True, return_dict_in_generate=True)
        out = generate(generation_config=config, **kwargs)
        captured["scores"] = torch.stack(out.scores, dim=1)  # [N, new, V]
        return out.sequences

    loaded.model.generate = recording_generate
    torch.manual_seed(0)
    rollout = sampler.sample(loaded.model, batch, generations, device=CPU,
                             float_dtype=loaded.model.dtype)
    piece = rollout.rows(torch.arange(rollout.size))
    with torch.no_grad():
        logits = loaded.model(**model_inputs(piece.batch, device=CPU, float_dtype=loaded.model.
                                             dtype, flash_attention=False),
                              logits_to_keep=piece.positions).logits
    logps, entropy = response_logps(logits, piece.response_ids, temperature=temperature,
                                    suppress_token_ids=sampler.suppress_token_ids)
    width = rollout.mask.shape[1]
    drawn = torch.log_softmax(captured["scores"][:, :width].float(), dim=-1).gather(
        -1, piece.response_ids.unsqueeze(-1)).squeeze(-1)
    diff = float(((logps - drawn).abs() * rollout.mask).max())
    assert torch.isfinite(entropy).all()
    return rollout, diff, sampler


def test_rollout_log_probs_are_the_sampling_distributions(tiny_llava_dir,
                                                         prompt_shards,  # noqa: F811
                                                         one_thread):
    from mmjobs.data.loader import build_dataloader

    loaded = load_model(ModelConfig(name_or_path=str(tiny_llava_dir)), for_training=False)
    loader = build_dataloader(prompt_shards, batch_size=3, mode="random", max_length=None,
                              seed=0, num_workers=0,
                              image_processor=loaded.processor.image_processor)
    batch = next(iter(loader))
    rollout, diff, sampler = _sample_and_compare(loaded, batch, generations=2,
                                                 temperature=0.7)
    assert diff < 1e-5, diff
    assert rollout.size == 6 and rollout.prompt_ids[::2] == batch["ids"]
    assert rollout.num_images.tolist() == [1] * 6
    assert rollout.images["pixel_values"].shape[0] == 6
    torch.testing.assert_close(rollout.images["pixel_values"][0],
                               rollout.images["pixel_values"][1])  # a prompt's two samples
    # The image placeholder and pad are never sampled; each row is its prompt, then its
    # response, then padding.
    assert not torch.isin(rollout.response_ids, torch.tensor(sampler.suppress_token_ids)).any()
    for i in range(rollout.size):
        p, r = int(rollout.prompt_lengths[i]), int(rollout.response_lengths[i])
        assert rollout.input_ids[i, p:p + r].tolist() == rollout.response_ids[i, :r].tolist()
        assert int(rollout.attention_mask[i].sum()) == p + r
        assert int(rollout.positions[i, 0]) == p - 1


def test_chameleon_prompts_carry_vq_tokens_and_roll_out_consistently(tmp_path,
                                                                     tiny_chameleon_dir,  # noqa: F811
                                                                     one_thread):
    from mmjobs.data.loader import build_dataloader

    shards = build_prompt_shards(tmp_path, tiny_chameleon_dir, prompt_records(4), "cham")
    rows = _rows(shards)
    assert all(len(r.images) == 0 and r.num_image_tokens == 16 for r in rows.itertuples())
    loaded = load_model(ModelConfig(name_or_path=str(tiny_chameleon_dir)), for_training=False)
    image_ids = set(loaded.model.model.vocabulary_mapping.image_tokens)
    assert sum(t in image_ids for t in rows.iloc[0].input_ids) == 16  # VQ codes, in place
    loader = build_dataloader(shards, batch_size=2, mode="random", max_length=None, seed=0,
                              num_workers=0)
    _, diff, _ = _sample_and_compare(loaded, next(iter(loader)), generations=2,
                                     temperature=1.0)
    assert diff < 1e-5, diff


def test_a_reward_model_scores_policy_tokens_like_its_training_pairs(
        tmp_path, tiny_llava_dir, prompt_shards, one_thread):  # noqa: F811
    from mmjobs.train.reward_model import RewardModel, export_reward_model

    spec = ModelConfig(name_or_path=str(tiny_llava_dir))
    loaded = load_model(spec, for_training=False)
    torch.manual_seed(3)
    export_reward_model(RewardModel(loaded.model), None, RmConfig(finetune="full"),
                        tmp_path, base_model=spec, processor=loaded.processor,
                        source_dir=loaded.model_dir, meta={"max_length": 256})
    uri = str(tmp_path / "reward_model")
    reward = build_reward(RewardConfig(kind="model", model=uri),
                          tokenizer=loaded.processor.tokenizer, device=CPU, batch_size=2)
    assert isinstance(reward, ModelReward) and reward.suffix  # the template's "\n" after </s>

    # "Generated" responses: the tokens the SFT encoding gives each answer (its end token
    # included), after the pretokenized prompt, one finished and one cut short.
    records = {r["id"]: r for r in prompt_records(8)}
    prompts = _rows(prompt_shards).iloc[:2]
    encoder = reward.model.scorer.encoder
    answers = ["The largest bar is 7.", "Correct, verified."]
    responses, expected = [], []
    for row, answer in zip(prompts.itertuples(), answers, strict=True):
        enc = encoder.encode_messages(row.id, [*records[row.id]["prompt"], {
            "role": "assistant", "content": answer}], list(row.images), last_turn_only=True)
        responses.append(torch.tensor([t for t, lab in zip(enc.input_ids, enc.labels,
                                                           strict=True) if lab != -100]))
        expected.append(reward.model.score(records[row.id]["prompt"], answer, list(row.images)))
    responses[1] = responses[1][:-1]  # no end token: truncated, scored as it stands
    sampler = ResponseSampler(loaded.processor.tokenizer, max_new_tokens=32, temperature=1.0,
                              eos_token_ids=[2])
    pixels = loaded.processor.image_processor(
        [_decode(b) for r in prompts.itertuples() for b in r.images],
        return_tensors="pt")["pixel_values"]
    width = max(len(r.input_ids) for r in prompts.itertuples())
    ids = torch.zeros(2, width, dtype=torch.long)
    for k, r in enumerate(prompts.itertuples()):
        ids[k, :len(r.input_ids)] = torch.tensor(list(r.input_ids))
    rollout = sampler._assemble(
        ids, torch.tensor([len(r.input_ids) for r in prompts.itertuples()]), responses,
        torch.tensor([True, False]), {"pixel_values": pixels}, torch.tensor([1, 1]),
        list(prompts.id))
    scores = reward(rollout)
    assert float(scores[0]) == pytest.approx(expected[0], abs=1e-4)
    assert float(scores[1]) != pytest.approx(expected[1], abs=1e-4)  # no end token, no suffix


def _decode(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")
