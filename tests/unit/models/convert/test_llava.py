"""Original LLaVA checkpoints -> transformers' LLaVA: logits equal an independent reference.

The reference is written here, not taken from the converter: it loads the pickled state dicts
with the key mapping done by hand into transformers' Llama and CLIP vision classes and an
`nn.Sequential` projector, and runs LLaVA's own forward recipe (CLIP layer -2 without CLS ->
projector -> spliced into the token embeddings where LLaVA's -200 sentinel sits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mmjobs.models.convert import ConversionError, convert_original_llava

CLIP = "openai/clip-vit-large-patch14-336"
PROJECTOR = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"


def _pickles(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "pytorch_model.bin.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["pytorch_model.bin"])
    state = {}
    for file in files:  # our own replica files: plain state dicts
        state.update(torch.load(model_dir / file, weights_only=True))
    return {k: v.float() for k, v in state.items()}


def reference_logits(llm_dir: Path, clip_dir: Path, projector_file: Path | None,
                     before: torch.Tensor, after: torch.Tensor,
                     pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA-1.5's forward for `before <image> after`, from the original files."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    raw = json.loads((llm_dir / "config.json").read_text())
    llm = LlamaForCausalLM(LlamaConfig(**{k: raw[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings")}))
    state = _pickles(llm_dir)
    llm.load_state_dict({k: v for k, v in state.items()
                         if "mm_projector" not in k and "inv_freq" not in k})  # strict
    vision_cfg = json.loads((clip_dir / "config.json").read_text())["vision_config"]
    clip = CLIPVisionModel(CLIPVisionConfig(**{k: vision_cfg[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "hidden_act", "layer_norm_eps")}))
    clip.load_state_dict({k.removeprefix("vision_model."): v for k, v in _pickles(clip_dir).items()
                          if k.startswith("vision_model.") and "position_ids" not in k})
    projector = nn.Sequential(nn.Linear(vision_cfg["hidden_size"], raw["hidden_size"]), nn.GELU(),
                              nn.Linear(raw["hidden_size"], raw["hidden_size"]))
    source = state if projector_file is None else {
        k: v.float() for k, v in torch.load(projector_file, weights_only=True).items()}
    projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in source.items()
                               if "mm_projector." in k})
    with torch.no_grad():
        features = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        embed = llm.get_input_embeddings()
        inputs = torch.cat([embed(before), projector(features), embed(after)], dim=1)
        return llm(inputs_embeds=inputs).logits


@pytest.mark.parametrize("source", ["llava_llama", "vicuna+projector"])
def test_converted_logits_equal_the_original_layouts(replica_dir, tmp_path, source):
    from transformers import AutoModelForImageTextToText

    clip = replica_dir(CLIP)
    if source == "llava_llama":
        llm, projector_file = replica_dir("liuhaotian/llava-v1.5-7b"), None
    else:
        llm, projector_file = (replica_dir("lmsys/vicuna-7b-v1.5"),
                               replica_dir(PROJECTOR) / "mm_projector.bin")
    out = tmp_path / "converted"
    summary = convert_original_llava(llm, clip, out, projector=projector_file,
                                     max_shard_size="2MB")
    assert summary["added_tokens"] == {"<image>": 32000, "<pad>": 32001}
    assert summary["vocab_size"] == 32064 and len(summary["weight_files"]) > 2  # sharded

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 336, 336)
    before = torch.tensor([[1, 3000, 400, 50, 13]])
    after = torch.tensor([[13, 500, 600, 7000, 31999, 2]])
    expected = reference_logits(llm, clip, projector_file, before, after, pixels)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    input_ids = torch.cat([before, torch.full((1, 576), 32000), after], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    assert logits.shape == (1, 587, 32064)
    assert (logits[..., :32000] - expected).abs().max() <= 1e-5
    # The added tokens' rows are the mean row: never above the best real token.
    assert (logits[..., 32000:].max(-1).values <= logits[..., :32000].max(-1).values).all()


def test_converted_model_has_llava_hf_layout_and_a_matching_processor(replica_dir, tmp_path):
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor

    out = tmp_path / "converted"
    convert_original_llava(replica_dir("lmsys/vicuna-7b-v1.5"), replica_dir(CLIP), out,
                           projector=replica_dir(PROJECTOR))
    hf = replica_dir("llava-hf/llava-1.5-7b-hf")
    hf_names = set(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == hf_names  # exactly llava-hf's tensor names
    config = json.loads((out / "config.json").read_text())
    assert (config["image_token_index"], config["pad_token_id"], config["vision_feature_layer"],
            config["vision_feature_select_strategy"]) == (32000, 32001, -2, "default")
    generation = json.loads((out / "generation_config.json").read_text())
    assert "temperature" not in generation and generation["pad_token_id"] == 32001

    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template is None  # vicuna ships none: vicuna_v1 is rendered by name
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad"
    wide = Image.new("RGB", (600, 200), (255, 0, 0))
    batch = processor(images=wide, text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")
    assert int((batch["input_ids"] == 32000).sum()) == 576
    # Padded to a square with the mean colour first (LLaVA's expand2square): the top rows are
    # the normalised (122, 116, 104) background, not red.
    mean = torch.tensor(processor.image_processor.image_mean)[:, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None]
    top = batch["pixel_values"][0, :, 0, :]
    background = (torch.tensor([122, 116, 104])[:, None] / 255 - mean) / std
    assert torch.allclose(top, background.expand_as(top), atol=1e-2)


def test_a_plain_llama_without_projector_is_refused(replica_dir, tmp_path):
    with pytest.raises(ConversionError, match="needs the projector pretrained for it"):
        convert_original_llava(replica_dir("lmsys/vicuna-7b-v1.5"), replica_dir(CLIP),
                               tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_llava_settings_are_refused_with_the_key(replica_dir, tmp_path):
    import shutil

    llm = tmp_path / "llava"
    shutil.copytree(replica_dir("liuhaotian/llava-v1.5-7b"), llm)
    config = json.loads((llm / "config.json").read_text())
    config.update(mm_use_im_start_end=True, image_aspect_ratio="anyres")
    (llm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as err:
        convert_original_llava(llm, replica_dir(CLIP), tmp_path / "out")
    assert "mm_use_im_start_end=true" in str(err.value)
    assert "image_aspect_ratio='anyres'" in str(err.value)


def test_projector_width_mismatch_is_reported_by_tensor(replica_dir, tmp_path):
    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 48),
                "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.2.weight": torch.zeros(64, 64),
                "model.mm_projector.2.bias": torch.zeros(64)}, bad)
    with pytest.raises(ConversionError,
                       match=r"shape multi_modal_projector\.linear_1\.weight \(64, 48\) != "
                             r"\(64, 32\)"):
        convert_original_llava(replica_dir("lmsys/vicuna-7b-v1.5"), replica_dir(CLIP),
                               tmp_path / "out", projector=bad)
