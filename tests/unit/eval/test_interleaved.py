"""Chameleon-style interleaved outputs on the tiny Chameleon: image tokens in the labels are
learned (SFT through prepare -> pretokenize -> train), and the infer stage generates image
spans and decodes them to PNGs with the VQ decoder.

Upstream transformers masks Chameleon's image-code logits in the forward; mmjobs' model loader
lifts that for training (`mmjobs.models.image_tokens.enable_image_generation`), and this test
goes through the real loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmjobs import storage
from mmjobs.eval.interleaved import (
    ImageSpanLogitsProcessor,
    enable_image_generation,
    image_code_tokens,
    image_name,
)
from mmjobs.models.vq_decoder import DECODER_FILE, ImageDecoder, VQDecoder, find_decoder_weights
from tests.shards import shard_files

COLOURS = {"red": (230, 20, 20), "blue": (20, 40, 230)}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(model_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoModelForImageTextToText.from_pretrained(model_dir).eval(),
            AutoProcessor.from_pretrained(model_dir))


# --------------------------------------------------------------------------- pieces


def test_upstream_masks_image_logits_and_enable_image_generation_unmasks(tiny_chameleon_dir):
    model, processor = _model(tiny_chameleon_dir)
    codes = image_code_tokens(model)
    assert len(codes) == 64
    pixels = processor.image_processor(images=[Image.new("RGB", (32, 32), COLOURS["red"])],
                                       return_tensors="pt")["pixel_values"]
    before = model.model.get_image_tokens(pixels)
    ids = torch.tensor([[1, 5, processor.image_start_token_id, *before[0].tolist(),
                         processor.image_end_token_id]])
    with torch.no_grad():
        masked = model(input_ids=ids, labels=ids)
    assert torch.isinf(masked.loss)  # upstream: image tokens cannot be learned
    assert (masked.logits[0, :, codes] == torch.finfo(masked.logits.dtype).min).all()

    assert enable_image_generation(enable_image_generation(model)) is model  # idempotent
    with torch.no_grad():
        open_ = model(input_ids=ids, labels=ids)
    assert torch.isfinite(open_.loss) and open_.logits[0, :, codes].std() > 0
    # Images still encode to the same tokens (the code <-> token tables are intact).
    assert torch.equal(model.model.get_image_tokens(pixels), before)
    with pytest.raises(ValueError, match="not an image-token model"):
        enable_image_generation(torch.nn.Linear(2, 2))


def test_vq_decoder_round_trips_through_the_model_directory(tiny_chameleon_dir, tmp_path):
    model, processor = _model(tiny_chameleon_dir)
    from safetensors import safe_open

    with safe_open(str(tiny_chameleon_dir / DECODER_FILE), framework="pt") as f:
        saved = sorted(f.keys())
    decoder = VQDecoder(model.config.vq_config)
    assert saved == sorted(f"model.vqmodel.decoder.{k}" for k in decoder.state_dict())
    # Found from the directory or from the file itself; the codebook comes from the model.
    state = find_decoder_weights(tiny_chameleon_dir)
    assert {k.split(".")[0] for k in state} == {"decoder"}
    assert find_decoder_weights(tiny_chameleon_dir / DECODER_FILE).keys() == state.keys()
    empty = tmp_path / "no-decoder"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no VQ decoder weights"):
        find_decoder_weights(empty)

    images = ImageDecoder(model, processor, tiny_chameleon_dir)
    assert (images.codes_per_image, images.image_size) == (16, 32)
    codes = torch.tensor([image_code_tokens(model)[:16], image_code_tokens(model)[16:32]])
    first, second = images.images(codes)
    assert first.size == second.size == (32, 32) and first.mode == "RGB"
    assert first.tobytes() != second.tobytes()
    again = ImageDecoder(model, processor, tiny_chameleon_dir).images(codes[:1])[0]
    assert again.tobytes() == first.tobytes()  # deterministic
    with pytest.raises(ValueError, match="not image codes"):
        images.images(torch.tensor([[5] * 16]))


def _greedy(processor_: ImageSpanLogitsProcessor, scores: torch.Tensor, steps: int,
            prompt: torch.Tensor) -> torch.Tensor:
    ids = prompt
    for t in range(steps):
        logits = processor_(ids, scores[:, t].clone())
        ids = torch.cat([ids, logits.argmax(dim=1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def test_logits_processor_forms_whole_image_spans() -> None:
    boi, eoi, codes, n = 90, 91, list(range(10, 20)), 4
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 24, 100, generator=gen)
    scores[:, :, boi] += 6.0  # the model loves starting images
    scores[:, :, eoi] += 8.0  # ... and ending them early
    scores[:, :, 50] += 9.0  # and the input placeholder
    proc = ImageSpanLogitsProcessor(prompt_length=2, boi=boi, eoi=eoi, code_tokens=codes,
                                    codes_per_image=n, max_new_tokens=24, max_images=2,
                                    banned=[50])
    out = _greedy(proc, scores, 24, torch.zeros(3, 2, dtype=torch.long))
    for row in out.tolist():
        assert 50 not in row
        starts = [i for i, t in enumerate(row) if t == boi]
        assert len(starts) == 2  # max_images
        for s in starts:
            assert all(t in codes for t in row[s + 1:s + 1 + n]) and row[s + 1 + n] == eoi
        inside = {i for s in starts for i in range(s, s + n + 2)}
        assert all(t not in codes and t != eoi for i, t in enumerate(row) if i not in inside)
    # No room for a whole span: no image is started.
    late = ImageSpanLogitsProcessor(prompt_length=2, boi=boi, eoi=eoi, code_tokens=codes,
                                    codes_per_image=n, max_new_tokens=n + 1, max_images=5)
    assert boi not in _greedy(late, scores, n + 1, torch.zeros(3, 2, dtype=torch.long)).tolist()


def test_image_names_are_safe_and_distinct() -> None:
    a, b = image_name("a/b c", 0), image_name("a_b_c", 0)
    assert a.startswith("images/a_b_c-") and a.endswith("-0.png") and a != b


# --------------------------------------------------------------------------- learning


def _ti2ti_rows(root: Path) -> Path:
    """Align-Anything TI2TI SFT rows: 'Draw a <colour> square.' -> text + that colour's square
    (a fixed 32x32 image per keyword, so its 16 VQ tokens are learnable)."""
    rows = []
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{colour}.png")
        rows += [{"id": f"{colour}-{i}", "question": f"Draw a {colour} square.",
                  "response": f"Here is a {colour} square:", "image_url": [],
                  "output_image_url": f"{colour}.png"} for i in range(4)]
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _shard_rows(shards: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [row for path in shard_files(shards)
            for row in pq.read_table(path).to_pylist()]


def image_token_loss(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    """Mean next-token loss on the labelled image-code tokens of `rows` (image logits on)."""
    model, _ = _model(model_dir)
    enable_image_generation(model)
    codes = set(image_code_tokens(model))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            picked = torch.tensor([t in codes for t in labels.tolist()])
            total += -logp[picked, labels[picked]].sum().item()
            count += int(picked.sum())
    return total / count


@pytest.mark.slow
def test_chameleon_learns_image_tokens_in_responses_and_generates_them(
        tmp_path, tiny_chameleon_dir, one_thread):
    from mmjobs.stages import infer, prepare, pretokenize, train

    data = tmp_path / "raw"
    data.mkdir()
    prepared = prepare.main(prepare.PrepareConfig(
        source_format="align-anything-ti2ti", input=str(_ti2ti_rows(data)),
        output=str(tmp_path / "prepared")))
    shards = pretokenize.main(pretokenize.PretokenizeConfig(
        dataset=prepared.output, model=str(tiny_chameleon_dir), max_length=128,
        cache_root=str(tmp_path / "cache"))).output

    # The response image is in the labels: begin-image, its 16 VQ tokens, end-image.
    model, processor = _model(tiny_chameleon_dir)
    codes = set(image_code_tokens(model))
    rows = _shard_rows(shards)
    targets = {}
    for colour, rgb in COLOURS.items():
        pixels = processor.image_processor(images=[Image.new("RGB", (32, 32), rgb)],
                                           return_tensors="pt")["pixel_values"]
        targets[colour] = model.model.get_image_tokens(pixels)[0].tolist()
    assert targets["red"] != targets["blue"]
    for row in rows:
        labels = row["labels"]
        start = labels.index(processor.image_start_token_id)
        colour = row["id"].split("-")[0]
        assert labels[start + 1:start + 17] == targets[colour]
        assert labels[start + 17] == processor.image_end_token_id
        assert sum(t in codes for t in labels) == 16
    before = image_token_loss(tiny_chameleon_dir, rows)

    trained = train.main(train.TrainStageConfig.model_validate({
        "model": {"name_or_path": str(tiny_chameleon_dir)}, "data": shards,
        "output": str(tmp_path / "sft"),
        "train": {"mode": "sft", "finetune": "full", "freeze_connector": True, "lr": 3e-3,
                  "lr_schedule": "constant", "warmup_ratio": 0.0, "max_steps": 40,
                  "per_device_batch_size": 4, "batching": "random", "max_grad_norm": 1.0,
                  "checkpoint_every_steps": 0, "dataloader_workers": 0}}))
    assert trained.model is not None and trained.final_loss < 0.5
    after = image_token_loss(Path(trained.model), rows)
    assert after < 0.1 * before, (before, after)

    # Interleaved inference: the fully fine-tuned model was saved without the VQ decoder (a
    # transformers save); the base model's is used.
    result = infer.main(infer.InferConfig(
        model=trained.model, dataset=prepared.output, modalities=["text", "image"],
        vq_decoder=str(tiny_chameleon_dir), max_new_tokens=40, batch_size=8,
        output=str(tmp_path / "infer")))
    out = Path(result.output)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text()
                   .splitlines()]
    assert len(predictions) == 8
    decoder = ImageDecoder(model, processor, tiny_chameleon_dir)
    expected = {c: decoder.images(torch.tensor([t]))[0].tobytes() for c, t in targets.items()}
    for row in predictions:
        colour = row["id"].split("-")[0]
        assert row["prediction"] == f"Here is a {colour} square:<image>", row
        assert [p["type"] for p in row["parts"]] == ["text", "image"]
        (rel,) = row["output_images"]
        assert row["parts"][1]["path"] == rel and row["images"] == [rel]
        with Image.open(out / rel) as png:
            assert png.size == (32, 32) and png.format == "PNG"
            # Exactly the training image's VQ tokens, decoded by the (random) tiny decoder.
            assert png.convert("RGB").tobytes() == expected[colour]
    manifest = {f.path for f in storage.read_manifest(str(out)).files}
    assert {r["output_images"][0] for r in predictions} <= manifest
    summary = json.loads((out / "infer.json").read_text())
    assert summary["output_images"] == 8


def test_interleaved_settings_are_checked(tiny_llava_dir) -> None:
    from mmjobs.eval.generate import load_for_inference
    from mmjobs.eval.interleaved import InterleavedGenerator
    from mmjobs.stages.infer import InferConfig

    with pytest.raises(ValueError, match="list text"):
        InferConfig(model="m", dataset="d", modalities=["image"])
    assert InferConfig(model="m", dataset="d", modalities=["text", "image"]).interleaved
    assert not InferConfig(model="m", dataset="d").interleaved
    with pytest.raises(ValueError, match="not an image-token model"):
        InterleavedGenerator(load_for_inference(str(tiny_llava_dir)))
