"""The InternLM-XComposer2 replica against its published files, and through the converter into
mmjobs' native model (safetensors + processor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmjobs.models.convert import UnsafeCheckpointError, load_tensors
from mmjobs.models.replicas import PUBLISHED_ROOT

NAME = "internlm/internlm-xcomposer2-7b"
FOLDER = "internlm--internlm-xcomposer2-7b"
POSITIONS = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"


@pytest.fixture(scope="module")
def native(replica_dir, tmp_path_factory) -> Path:
    from mmjobs.models.xcomposer2 import convert_xcomposer2

    out = tmp_path_factory.mktemp("xc2") / "native"
    convert_xcomposer2(replica_dir(NAME), out,
                       vision_dir=replica_dir("openai/clip-vit-large-patch14-336"))
    return out


def test_config_is_the_published_one_shrunk(replica_dir):
    src = replica_dir(NAME)
    real = json.loads((PUBLISHED_ROOT / FOLDER / "config.json").read_text())
    replica = json.loads((src / "config.json").read_text())
    shrunk = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads"}
    assert {k: v for k, v in replica.items() if k not in shrunk} == \
        {k: v for k, v in real.items() if k not in shrunk}
    assert list(replica)[-1] == "img_size" == list(real)[-1]  # appended, as published
    assert replica["num_attention_heads"] // replica["num_key_value_heads"] == 32 // 8
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (src / name).read_bytes() == (PUBLISHED_ROOT / FOLDER / name).read_bytes()


def test_tokenizer_has_the_turn_markers_at_their_ids(replica_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(replica_dir(NAME) / "tokenizer.model"))
    assert sp.get_piece_size() == 92544
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 92542, 92543)] == \
        ["<unk>", "<s>", "</s>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]
    ids = sp.encode("[UNUSED_TOKEN_146]assistant\n42[UNUSED_TOKEN_145]\n")
    assert 92543 in ids and 92542 in ids  # user-defined: emitted whole


def test_weights_are_one_bf16_pickle_under_the_official_names(replica_dir):
    src = replica_dir(NAME)
    assert not list(src.glob("*.index.json")) and not list(src.glob("*.safetensors"))
    tensors = load_tensors(src / "pytorch_model.bin")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    hidden, heads, kv = 64, 4, 1
    head_dim = hidden // heads
    assert tensors["model.layers.0.attention.wqkv.weight"].shape == \
        ((heads + 2 * kv) * head_dim, hidden)
    assert tensors["model.layers.1.feed_forward.w2.Plora_A.weight"].shape == (256, 128)
    assert tensors["vision_proj.0.weight"].shape == (64, 32)
    assert tensors["vision_proj.2.weight"].shape == (64, 64)
    assert tensors[POSITIONS].shape == (1226, 32)
    assert "output.weight" in tensors and "model.tok_embeddings.weight" in tensors


def test_converted_model_reads_an_image_as_1225_positions(native):
    from transformers import AutoModelForCausalLM, AutoProcessor

    from mmjobs.models.xcomposer2 import register

    register()
    assert {p.name for p in native.iterdir()} >= {"config.json", "model.safetensors",
                                                  "tokenizer.json", "processor_config.json"}
    processor = AutoProcessor.from_pretrained(native)
    model = AutoModelForCausalLM.from_pretrained(native).eval()
    prompt = ("[UNUSED_TOKEN_146]user\n<ImageHere>What is the peak?[UNUSED_TOKEN_145]\n"
              "[UNUSED_TOKEN_146]assistant\n")
    inputs = processor(text=[prompt], images=[Image.new("RGB", (320, 200), (200, 30, 30))],
                       return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 490, 490)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 1225
    assert inputs["input_ids"][0, 0] == 1
    assert 92543 in inputs["input_ids"][0].tolist() and 92542 in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 92544)
    assert torch.isfinite(logits).all()


def test_224px_position_embeddings_are_interpolated_like_resize_pos(replica_dir, tmp_path):
    from safetensors.torch import load_file

    from mmjobs.models.xcomposer2 import convert_xcomposer2
    from mmjobs.models.xcomposer2.convert import interpolate_positions

    src = tmp_path / "clip336"
    src.mkdir()
    for f in replica_dir(NAME).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    # Read the replica's own file (loading memory-maps it; never overwrite a mapped file).
    tensors = {k: v.clone()
               for k, v in load_tensors(replica_dir(NAME) / "pytorch_model.bin").items()}
    original = torch.randn(577, 32).to(torch.bfloat16)  # CLIP-336: 24 x 24 + CLS
    tensors[POSITIONS] = original
    torch.save(tensors, src / "pytorch_model.bin")
    summary = convert_xcomposer2(src, tmp_path / "out",
                                 vision_dir=replica_dir("openai/clip-vit-large-patch14-336"))
    assert summary["positions_interpolated"] is True
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))[POSITIONS]
    assert converted.shape == (1226, 32)
    assert torch.equal(converted[0], original[0])  # CLS kept
    assert torch.equal(converted, interpolate_positions(original, 35))


def test_a_pickle_that_needs_code_is_refused(replica_dir, tmp_path):
    from mmjobs.models.xcomposer2 import convert_xcomposer2

    src = tmp_path / "hostile"
    src.mkdir()
    for f in replica_dir(NAME).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    # A global reference: unpickling it means importing and binding code.
    torch.save({"weights": torch.zeros(1), "hook": print}, src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refused"):
        convert_xcomposer2(src, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_hub_layout_is_detected_for_the_convert_stage(replica_dir, native):
    from mmjobs.models.convert import detect_kind

    assert detect_kind(replica_dir(NAME)) == "xcomposer2"
    assert detect_kind(native) == "xcomposer2"  # converting again reads the config as well


def test_the_builder_and_pretokenize_read_the_converted_dir_without_remote_code(native):
    import io

    from mmjobs.config import ModelConfig
    from mmjobs.data.sample_encoder import SampleEncoder, SampleRejected
    from mmjobs.models.builder import load_model
    from mmjobs.train.moe import as_mmjobs_connector

    loaded = load_model(ModelConfig(name_or_path=str(native)), for_training=False)
    assert type(loaded.model).__name__ == "XComposer2ForCausalLM"
    assert type(loaded.processor).__name__ == "XComposer2Processor"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    encoder = SampleEncoder(native, max_length=2048, conversation_format="internlm_xcomposer2")
    for marker in ("<image>", "<ImageHere>"):  # canonical rows, or ChartMoE-Data's text as is
        encoded = encoder.encode_messages("r", [
            {"role": "user", "content": f"{marker}What is the peak?"},
            {"role": "assistant", "content": "42"}], [png])
        assert encoded.num_image_tokens == 1225
        assert encoded.input_ids.count(loaded.model.config.image_token_id) == 1225
        labelled = [t for t in encoded.labels if t != -100]
        assert encoder.tokenizer.decode(labelled) == "42[UNUSED_TOKEN_145]\n</s>"
    with pytest.raises(SampleRejected, match=r"0 <ImageHere> / <image> markers but 1 images"):
        encoder.encode_messages("r", [{"role": "user", "content": "What is the peak?"},
                                      {"role": "assistant", "content": "42"}], [png])
    # vision_proj (nn.Sequential) saves as mmjobs' mlp2x_gelu connector, same outputs.
    features = torch.randn(3, loaded.model.config.vision_config.hidden_size)
    plain = as_mmjobs_connector(loaded.model.vision_proj)
    assert type(plain).__name__ == "MLP2xGeluConnector"
    assert torch.equal(plain(features), loaded.model.vision_proj(features))


def test_chartmoe_eval_puts_the_image_right_after_bos_and_stops_at_the_turn_end(native):
    from mmjobs.config import ModelConfig
    from mmjobs.eval.generate import Generator, PromptInput
    from mmjobs.models.builder import load_model

    loaded = load_model(ModelConfig(name_or_path=str(native)), for_training=False)
    gen = Generator(loaded, max_new_tokens=3, conversation_format="chartmoe_eval")
    prompt = PromptInput("<image>\nAnswer the question using a single word or phrase.Peak?",
                         [Image.new("RGB", (80, 60), (200, 30, 30))])
    text = gen.render(prompt)
    assert text == ("<ImageHere>[UNUSED_TOKEN_146]user\nAnswer the question using a single "
                    "word or phrase.Peak?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    ids = gen._encode([text], [prompt.images])["input_ids"][0].tolist()
    image_id = loaded.model.config.image_token_id
    # BOS, the 1225 image positions, then the text as the tokenizer reads it alone (ChartMoE's
    # robot tokenizes the prompt with BOS and puts the image embeddings after BOS).
    after = gen.tokenizer(text.removeprefix("<ImageHere>"), add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[1:1226] == [image_id] * 1225 and ids[1226:] == after
    assert 92543 in after[:2]
    eos = gen.generation_config.eos_token_id
    assert 92542 in eos and 2 in eos  # [UNUSED_TOKEN_145] ends the answer, as does </s>
    assert len(gen.generate([prompt])) == 1
