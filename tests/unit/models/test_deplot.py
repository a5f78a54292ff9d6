"""ChartWiz's DePlot-LLaVA (`mmjobs.models.deplot`): Pix2Struct encoder + causal LM, its
processor's image tokens, and the composition from the two replicas' directories."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmjobs.config import ModelConfig
from mmjobs.models.builder import load_model
from mmjobs.models.deplot.compose import compose_deplot_llava, save_composed_deplot_llava
from mmjobs.models.deplot.modeling import DeplotLlavaConfig
from mmjobs.models.deplot.processing import deplot_image_processor
from mmjobs.models.replicas.chartwiz import PIX2STRUCT, SYNATRA

PATCHES = 64  # a small max_patches; ChartWiz's 512 is the composition's default


@pytest.fixture(scope="module")
def composed(tmp_path_factory, replica_dir):
    out = tmp_path_factory.mktemp("deplot") / "chartwiz"
    summary = save_composed_deplot_llava(out, replica_dir(PIX2STRUCT), replica_dir(SYNATRA),
                                         max_patches=PATCHES, seed=0)
    return out, summary


@pytest.fixture(scope="module")
def loaded(composed):
    return load_model(ModelConfig(name_or_path=str(composed[0]), dtype="float32",
                                  attn_implementation="sdpa"), for_training=False)


def chart(width: int = 120, height: int = 60) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    image.paste((200, 30, 30), (10, 20, 40, 60))
    return image


def test_processor_expands_each_image_to_max_patches_tokens(loaded):
    processor = loaded.processor
    batch = processor(text=["<image>\n부산의 매출은?"], images=[chart()], return_tensors="pt")
    assert (batch["input_ids"] == processor.image_token_id).sum() == PATCHES
    # Pix2Struct's flattened patches: row, column, then 16 x 16 x 3 pixel values.
    assert batch["pixel_values"].shape == (1, PATCHES, 2 + 16 * 16 * 3)
    assert "flattened_patches" not in batch  # one name for images: pixel_values


def test_forward_gives_logits_over_the_vocabulary_with_image_features(loaded):
    model, processor = loaded.model, loaded.processor
    batch = processor(text=["<image>\n제목은?", "<image>\n값은?"], images=[chart(), chart(60, 120)],
                      return_tensors="pt", padding=True)
    out = model(**batch)
    vocab = model.config.text_config.vocab_size
    assert out.logits.shape == (*batch["input_ids"].shape, vocab)
    assert vocab == 32002 + 1  # Synatra's 32,002 tokens + <image>
    # The image positions carry the projected Pix2Struct features, not <image>'s embedding.
    features = model.model.get_image_features(batch["pixel_values"]).pooler_output
    assert len(features) == 2 and features[0].shape == (PATCHES, 64)
    assert not torch.equal(features[0], features[1])  # different images, different features


def test_image_features_are_the_encoder_last_hidden_state_through_the_projector(loaded):
    """ChartWiz reads `last_hidden_state` (after the encoder's final norm), every position."""
    model = loaded.model
    pixels = loaded.processor.image_processor([chart()], return_tensors="pt")["pixel_values"]
    encoder = model.model.vision_tower(flattened_patches=pixels)
    expected = model.model.multi_modal_projector(encoder.last_hidden_state)[0]
    assert torch.allclose(model.model.get_image_features(pixels).pooler_output[0], expected)
    # Padding patches (all-zero rows) are masked inside the encoder as Pix2Struct's own mask.
    own = deplot_image_processor(max_patches=PATCHES).to_dict()
    assert own["max_patches"] == PATCHES and own["is_vqa"] is False


def test_composition_copies_both_parts_weights(composed, replica_dir):
    from safetensors.torch import load_file

    out, summary = composed
    assert summary["kind"] == "deplot_llava" and summary["image_tokens"] == PATCHES
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deplot_llava" and config["image_seq_length"] == PATCHES
    saved = load_file(str(out / "model.safetensors"))
    pix2struct = load_file(str(replica_dir(PIX2STRUCT) / "model.safetensors"))
    synatra = load_file(str(replica_dir(SYNATRA) / "model.safetensors"))
    name = "encoder.encoder.layer.0.attention.query.weight"
    assert torch.equal(saved[f"model.vision_tower.{name.removeprefix('encoder.')}"],
                       pix2struct[name])
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(saved[f"model.language_model.{layer.removeprefix('model.')}"].float(),
                       synatra[layer].float())
    # ChartWiz's tokenizer setup: <image> appended, <unk> as padding.
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["pad_token"] == "<unk>"


def test_the_model_reloads_as_saved(composed, loaded):
    again = load_model(ModelConfig(name_or_path=str(composed[0]), dtype="float32",
                                   attn_implementation="sdpa"), for_training=False)
    batch = loaded.processor(text=["<image>"], images=[chart()], return_tensors="pt")
    assert torch.equal(again.model(**batch).logits, loaded.model(**batch).logits)
    assert type(again.model).__name__ == "DeplotLlavaForConditionalGeneration"


def test_wrong_inputs_fail_with_a_message():
    from transformers import CLIPVisionConfig, MistralConfig

    with pytest.raises(ValueError, match="not a Pix2Struct model"):
        compose_deplot_llava(CLIPVisionConfig(), MistralConfig(), image_token_id=5)
    with pytest.raises(ValueError, match="last_hidden_state"):
        DeplotLlavaConfig(vision_feature_layer=-2)


def test_pixels_that_are_not_flattened_patches_are_refused(loaded):
    with pytest.raises(ValueError, match="flattened patches"):
        loaded.model.model.get_image_features(torch.zeros(1, 3, 32, 32))
