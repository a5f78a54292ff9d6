"""Every seed base model's replica through the stages, in its seed's conversation format:

    pretokenize -> train lora -> merge -> infer,   train full -> infer

on llava-hf/llava-1.5-7b-hf (its own chat template), vicuna-7b-v1.5 + CLIP-336 + the LLaVA-1.5
pretrain projector converted by the `convert` stage (`vicuna_v1`), facebook/chameleon-7b and
PKU-Alignment/AA-chameleon-7b-base (`anything_ti2ti`, an output image in the labels). The
labels in the shards decode to the assistant text exactly as the seed writes it, and the
generation prompt is token for token the training sequence before its first label. Plus
`mmjobs serve` answering a chat on the llava-hf replica, with the prompt tokens training saw.

Two rows, one step of batch 2: the models are random, the point is that every stage runs on the real
layouts (576 image tokens at 336 px; 1024 VQ tokens at 512 px) and renders the seed's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmjobs.config import load_config
from mmjobs.stages import convert, infer, merge, pretokenize, train
from tests.chart_dataset import bar_chart_png, commit_dataset, write_chart_dataset
from tests.shards import shard_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "<image>\nWhat is this?"
ANSWERS = ["A cat.", "Two dogs."]


@dataclass(frozen=True)
class Case:
    """A replica, the format its seed trains with, and the labels that format gives."""

    replica: str
    fmt: str
    max_length: int
    labels: tuple[str, ...]
    output_image: bool = False  # the second row's answer draws an image (Chameleon)
    stops: tuple[str, ...] = ("</s>",)  # tokens that end an answer at inference


CASES = {
    "llava-hf": Case("llava-hf/llava-1.5-7b-hf", "auto", 700, ("A cat.", "Two dogs.")),
    "vicuna-llava": Case("lmsys/vicuna-7b-v1.5", "vicuna_v1", 700,
                         ("A cat.</s>", "Two dogs.</s>")),
    "chameleon": Case("facebook/chameleon-7b", "anything_ti2ti", 1100,
                      ("A cat.</s><reserved08706>", "Two dogs.</s><reserved08706>"),
                      stops=("</s>", "<reserved08706>")),
    "aa-chameleon": Case("PKU-Alignment/AA-chameleon-7b-base", "anything_ti2ti", 2200,
                         ("A cat.</s><reserved08706>",
                          "Two dogs.<image></s><reserved08706>"), output_image=True,
                         stops=("</s>", "<reserved08706>")),
}


def _samples(case: Case) -> list[dict]:
    rows = []
    for i, answer in enumerate(ANSWERS):
        images = [f"images/in-{i}.png"]
        if case.output_image and i == 1:
            answer, images = answer + "<image>", [*images, "images/out-1.png"]
        rows.append({"id": f"r{i}", "images": images, "meta": {},
                     "conversations": [{"role": "user", "content": QUESTION},
                                       {"role": "assistant", "content": answer}]})
    return rows


def _model(case: Case, replica_dir, tmp_path: Path) -> str:
    """The replica's directory; vicuna + CLIP + projector go through the convert stage."""
    if case.replica != "lmsys/vicuna-7b-v1.5":
        return str(replica_dir(case.replica))
    converted = convert.main(load_config(convert.ConvertConfig, {
        "source": str(replica_dir(case.replica)), "kind": "llava",
        "vision_tower": str(replica_dir("openai/clip-vit-large-patch14-336")),
        "projector": str(replica_dir(
            "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")),
        "to": str(tmp_path / "converted")}))
    return converted.model


def _decoded_labels(tokenizer, labels: list[int], boi: int | None, eoi: int | None) -> str:
    """Labels decoded; each Chameleon image span (begin, codes, end) shown as `<image>`."""
    text, run, k = [], [], 0
    learned = [t for t in labels if t != -100]
    while k < len(learned):
        if learned[k] == boi:
            text.append(tokenizer.decode(run) + "<image>")
            run, end = [], learned.index(eoi, k)
            assert end - k - 1 == 1024, "an output image is 1024 VQ codes"
            k = end + 1
            continue
        run.append(learned[k])
        k += 1
    return "".join(text) + tokenizer.decode(run)


def _train(model: str, shards: str, out: Path, finetune: str, chameleon: bool) -> object:
    settings = {"mode": "sft", "finetune": finetune, "lr": 1e-3, "max_steps": 1,
                "per_device_batch_size": 2, "grad_accum": 1, "batching": "random",
                "checkpoint_every_steps": 0, "dataloader_workers": 0, "warmup_ratio": 0.0,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    if chameleon:  # no connector: its VQ image tokenizer is not trained
        settings["freeze_connector"] = True
    return train.main(load_config(train.TrainStageConfig, {
        "model": {"name_or_path": model}, "data": shards, "output": str(out),
        "train": settings}))


@pytest.mark.parametrize("name", list(CASES))
def test_replica_pretokenize_train_merge_infer(name, replica_dir, tmp_path, one_thread):
    from transformers import AutoProcessor

    from mmjobs.eval.generate import Generator, PromptInput, load_for_inference, load_image

    case = CASES[name]
    model = _model(case, replica_dir, tmp_path)
    local = write_chart_dataset(tmp_path / "local", _samples(case), image_size=(32, 32))
    dataset = commit_dataset(local, str(tmp_path / "dataset"))

    shards = pretokenize.main(load_config(pretokenize.PretokenizeConfig, {
        "dataset": dataset, "model": model, "max_length": case.max_length,
        "conversation_format": case.fmt, "output": str(tmp_path / "shards")}))
    assert (shards.rows_written, shards.rows_rejected) == (2, 0)
    processor = AutoProcessor.from_pretrained(model)
    tokenizer = processor.tokenizer
    boi, eoi = (getattr(processor, a, None) for a in ("image_start_token_id",
                                                      "image_end_token_id"))
    rows = {r["id"]: r for f in shard_files(shards.output)
            for r in pq.read_table(f).to_pylist()}
    decoded = tuple(_decoded_labels(tokenizer, rows[f"r{i}"]["labels"], boi, eoi)
                    for i in range(2))
    assert decoded == case.labels
    card = json.loads((Path(shards.output) / "card.json").read_text())
    assert card["processor"]["conversation_format"]["name"] == (
        "template" if case.fmt == "auto" else case.fmt)

    # Inference prompts exactly as training saw the text before the answer.
    loaded = load_for_inference(model, conversation_format=case.fmt)
    generator = Generator(loaded, max_new_tokens=2)
    eos = generator.generation_config.eos_token_id
    assert set(tokenizer.convert_tokens_to_ids(list(case.stops))) <= set(
        eos if isinstance(eos, list) else [eos])
    image = load_image(local / "images/in-0.png")
    text = generator.render(PromptInput([{"role": "user", "content": QUESTION}], [image]))
    prompt_ids = generator._encode([text], [[image]])["input_ids"][0].tolist()
    row = rows["r0"]
    first_label = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
    placeholder = tokenizer.convert_tokens_to_ids(processor.image_token)
    trained = row["input_ids"][:first_label]  # VQ codes stand where placeholders were
    assert len(prompt_ids) == len(trained)
    assert all(p == t for p, t in zip(prompt_ids, trained, strict=True) if p != placeholder)

    chameleon = "chameleon" in name
    lora = _train(model, shards.output, tmp_path / "lora", "lora", chameleon)
    assert lora.steps == 1 and lora.adapter
    merged = merge.main(merge.MergeConfig(base=model, adapter=lora.output,
                                          output=str(tmp_path / "merged")))
    assert merged.max_logit_diff is not None and merged.max_logit_diff < 1e-3
    full = _train(model, shards.output, tmp_path / "full", "full", chameleon)
    assert full.steps == 1 and full.model
    for trained_model, out in ((merged.model, "infer-lora"), (full.model, "infer-full")):
        result = infer.main(infer.InferConfig(
            model=trained_model, dataset=dataset, output=str(tmp_path / out), batch_size=2,
            max_new_tokens=3, conversation_format=case.fmt))
        predictions = [json.loads(line) for line in Path(result.predictions).read_text()
                       .splitlines()]
        assert [p["id"] for p in predictions] == ["r0", "r1"]
        assert all(isinstance(p["prediction"], str) for p in predictions)
        assert predictions[0]["gt"] == "A cat."


def test_serve_answers_a_chat_on_the_llava_hf_replica(replica_dir):
    """`mmjobs serve`'s API (the chat page posts to it) renders the chat with the model's
    template: its prompt is the training sequence before the answer, token for token."""
    from mmjobs.data.records import Sample
    from mmjobs.data.sample_encoder import SampleEncoder
    from mmjobs.eval.generate import load_for_inference
    from mmjobs.serve.app import ServeOptions, create_app
    from mmjobs.serve.limits import Limits
    from mmjobs.serve.server import ServerThread
    from tests.integration.serve.client import Client, chat_body

    model = replica_dir("llava-hf/llava-1.5-7b-hf")
    png = bar_chart_png([3, 1, 2], (32, 32))
    encoded = SampleEncoder(model, max_length=1024).encode(Sample.model_validate({
        "id": "s", "images": ["a.png"], "conversations": [
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "A cat."}]}),
        [png])
    training_prompt = next(i for i, lab in enumerate(encoded.labels) if lab != -100)

    loaded = load_for_inference(str(model))
    server = ServerThread(create_app(lambda: loaded, ServeOptions(
        "llava-hf-replica", Limits(default_max_new_tokens=4)))).start()
    try:
        client = Client(server.url)
        client.wait_ready()
        reply = client.chat(chat_body("llava-hf-replica", "What is this?", image=png,
                                      max_tokens=4, temperature=0))
        client.close()
    finally:
        server.stop()
    assert reply.status == 200, reply.body
    body = reply.json()
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["prompt_tokens"] == training_prompt  # BOS + text + 576 image tokens
